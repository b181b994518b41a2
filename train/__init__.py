"""The clipray training application: Ray Train workers running retrieval models under DeepSpeed.

    python -m train CONFIG [key=value ...]      (= clipray train CONFIG ...)

`driver.run` builds the Ray Data streams and the TorchTrainer; `loop.train_loop` is the one
per-worker function; `ds_config` is the one place the DeepSpeed config is made and the engine started.
"""
