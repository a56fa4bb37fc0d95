"""What the calibration commands (train, distill, search, overlap, eval) share: the corpora and the retrieval task,
the losses, the training loop, the evaluator that runs any pattern as a runtime flag array, and the plots."""
