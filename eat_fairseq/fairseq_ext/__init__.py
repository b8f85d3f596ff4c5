"""fairseq registration layer: importing this module registers every eat_* task, model and criterion."""
