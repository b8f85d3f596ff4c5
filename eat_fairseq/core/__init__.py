"""Pure-PyTorch core of EAT. Nothing under this package may import fairseq."""
