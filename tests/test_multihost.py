"""Multi-host: two local CPU processes with two fake devices each join one job (`--distributed`, a coordinator on
localhost) and generate on a mesh over the four global devices. Process 0 prints the greedy tokens of one process
with four fake devices and no mesh, and process 1 prints nothing."""

import json
import os
import socket
import subprocess
import sys

GENERATE = [sys.executable, "-m", "ic_jax.generate", "--config", "tiny", "--init", "random", "--prompt", "hello",
            "--max-new-tokens", "8", "--temperature", "0", "--json"]
TIMEOUT = 600


def cpu_env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_two_processes(command: list[str]) -> list[str]:
    """`command --distributed` as a job of two local processes with two fake CPU devices each; asserts both
    succeed and returns their stdouts."""
    port = free_port()
    job = [subprocess.Popen([*command, "--distributed", "--coordinator", f"localhost:{port}", "--num-processes", "2",
                             "--process-id", str(i)],
                            env=cpu_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
    try:
        outs = [p.communicate(timeout=TIMEOUT) for p in job]
    finally:
        for p in job:  # a process left waiting for its peer after a timeout is killed, never left to hang
            p.kill()
    for p, (_, err) in zip(job, outs):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outs]


def test_two_processes_generate_what_one_process_generates():
    outs = run_two_processes([*GENERATE, "--mesh", "data=2,tensor=2"])
    one = subprocess.run(GENERATE, env=cpu_env(4), capture_output=True, text=True, timeout=TIMEOUT)
    assert one.returncode == 0, one.stderr[-3000:]
    completions = json.loads(one.stdout)["completions"]
    assert json.loads(outs[0])["completions"] == completions and len(completions[0]) > 0
    assert outs[1] == ""
