"""Model I/O: resolving and loading a model spec, reading checkpoints tensor by tensor, the resume
folder's on-disk format, and writing the pruned model (in one piece or as shards)."""
