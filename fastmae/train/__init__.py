"""The DeepSpeed pretraining loop and its parts: config, optimizer, schedule, engine, checkpoints, logging,
signals and the NaN guard. The entry point is fastmae/pretrain.py."""
