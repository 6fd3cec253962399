"""Training algorithms as plug-ins (``train.algorithm``): GRPO (Flow-GRPO / DDPO), GRPO-Guard,
MixGRPO, DiffusionNFT and Advantage Weighted Matching. See ``base.Algorithm``."""

from epgrpo.trainer.algorithms.base import (Algorithm, available_algorithms, check_algorithm_options,
                                            create_algorithm, register_algorithm)

__all__ = ["Algorithm", "available_algorithms", "check_algorithm_options", "create_algorithm", "register_algorithm"]
