"""Every choice a config key offers, by name: a leaf that imports nothing of fedmask.

The config checks a value against these lists, ``fedmask list`` prints them, and the code
that implements a choice imports its list from here, so nothing below the config needs
to import the config to know what it accepts.
"""

from __future__ import annotations

# The kinds of mask a client trains (fedmask.methods: one module each). A plug-in
# aggregator names one of them as its ``mask_mode``.
MASK_MODES = ("topk", "bernoulli", "biprop", "slots", "laperm")

# the model, its frozen weights and its data
MODELS = ("mlp", "lenet-300-100", "conv2", "conv4", "conv6", "resnet18")
INITS = ("signed-kaiming-constant", "kaiming-normal", "kaiming-uniform", "signed-constant-e", "glorot-uniform")
DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "idx")
PARTITIONERS = ("iid", "dirichlet", "classes", "flwr-iid", "flwr-dirichlet", "flwr-pathological")
FLOWER_PARTITIONERS = ("flwr-iid", "flwr-dirichlet", "flwr-pathological")  # Flower Datasets' (an extra)
BATCHNORMS = ("stateless", "running")

# what the methods' layers and rules accept
EVAL_MASKS = ("threshold", "sample")
FEDPM_GRADIENTS = ("straight-through", "reference")
FEDPM_PRIOR_RESET_RULES = ("fedmask", "fl4health")
BIPROP_GRADIENTS = ("fedmask", "reference")
EDGE_POPUP_SERVER_RULES = ("pseudo-gradient", "vote-average", "vote-levels")
SLOT_SELECTIONS = ("greedy", "probabilistic")
SLOT_SCORE_INITS = ("kaiming-uniform", "reference")
ROBUST_RULES = ("none", "trimmed", "median")
OPTIMIZERS = ("adam", "sgd")

# the bytes each way
UPLINK_CODECS = ("auto", "packbits", "entropy", "relative-entropy")
DOWNLINK_CODECS = ("float32", "float16", "quantized", "lossless", "ef-qsgd")
MASK_DOWNLINK_CODECS = ("float32", "float16", "quantized", "lossless")  # what a mask state can be sent as
DENSE_DOWNLINK_CODECS = ("float32", "lossless", "ef-qsgd")  # dense weights: as they are, or the update squeezed
COMPRESSORS = ("sign", "scaled-sign", "qsgd", "topk")  # the compressed dense baselines' uploads

# faults and attacks the simulator injects
FAULTS = ("drop", "crash", "corrupt", "slow")
ATTACKS = ("none", "invert", "all-ones", "random", "colluding", "poison")
MASK_ATTACKS = ("none", "invert", "all-ones", "random", "colluding")  # what a mask upload can lie with
DENSE_ATTACKS = ("none", "poison")  # the dense baselines' weights or updates
CORRUPTIONS = ("truncate", "bit-flip", "foreign-fingerprint")

# where each run's numbers are mirrored
TRACKERS = ("none", "tensorboard", "mlflow")
DEVICES = ("auto", "cpu", "cuda")
