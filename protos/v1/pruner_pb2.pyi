from epgrpo.protos.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Strategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STRATEGY_UNSPECIFIED: _ClassVar[Strategy]
    STRATEGY_OVF: _ClassVar[Strategy]
    STRATEGY_RANDOM: _ClassVar[Strategy]
STRATEGY_UNSPECIFIED: Strategy
STRATEGY_OVF: Strategy
STRATEGY_RANDOM: Strategy

class Checkpoint(_message.Message):
    __slots__ = ("step", "keep")
    STEP_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    keep: int
    def __init__(self, step: _Optional[int] = ..., keep: _Optional[int] = ...) -> None: ...

class OpenRollout(_message.Message):
    __slots__ = ("rollout_id", "schedule", "strategy", "proxy_rewards", "seed", "num_steps", "decoder")
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    PROXY_REWARDS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    DECODER_FIELD_NUMBER: _ClassVar[int]
    rollout_id: str
    schedule: _containers.RepeatedCompositeFieldContainer[Checkpoint]
    strategy: Strategy
    proxy_rewards: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.RewardSpec]
    seed: int
    num_steps: int
    decoder: str
    def __init__(self, rollout_id: _Optional[str] = ..., schedule: _Optional[_Iterable[_Union[Checkpoint, _Mapping]]] = ..., strategy: _Optional[_Union[Strategy, str]] = ..., proxy_rewards: _Optional[_Iterable[_Union[_tensor_pb2.RewardSpec, _Mapping]]] = ..., seed: _Optional[int] = ..., num_steps: _Optional[int] = ..., decoder: _Optional[str] = ...) -> None: ...

class ScoreList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class GroupCheckpoint(_message.Message):
    __slots__ = ("group_id", "step", "sigma", "trajectory_ids", "previews", "scores", "prompts", "metadata", "group_size")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    TRAJECTORY_IDS_FIELD_NUMBER: _ClassVar[int]
    PREVIEWS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    step: int
    sigma: float
    trajectory_ids: _containers.RepeatedScalarFieldContainer[int]
    previews: _tensor_pb2.Tensor
    scores: ScoreList
    prompts: _containers.RepeatedScalarFieldContainer[str]
    metadata: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Metadata]
    group_size: int
    def __init__(self, group_id: _Optional[str] = ..., step: _Optional[int] = ..., sigma: _Optional[float] = ..., trajectory_ids: _Optional[_Iterable[int]] = ..., previews: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., scores: _Optional[_Union[ScoreList, _Mapping]] = ..., prompts: _Optional[_Iterable[str]] = ..., metadata: _Optional[_Iterable[_Union[_tensor_pb2.Metadata, _Mapping]]] = ..., group_size: _Optional[int] = ...) -> None: ...

class PruneStreamRequest(_message.Message):
    __slots__ = ("open", "checkpoint")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    open: OpenRollout
    checkpoint: GroupCheckpoint
    def __init__(self, open: _Optional[_Union[OpenRollout, _Mapping]] = ..., checkpoint: _Optional[_Union[GroupCheckpoint, _Mapping]] = ...) -> None: ...

class PruneRequest(_message.Message):
    __slots__ = ("checkpoint", "keep", "strategy", "proxy_rewards", "seed", "decoder")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    PROXY_REWARDS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DECODER_FIELD_NUMBER: _ClassVar[int]
    checkpoint: GroupCheckpoint
    keep: int
    strategy: Strategy
    proxy_rewards: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.RewardSpec]
    seed: int
    decoder: str
    def __init__(self, checkpoint: _Optional[_Union[GroupCheckpoint, _Mapping]] = ..., keep: _Optional[int] = ..., strategy: _Optional[_Union[Strategy, str]] = ..., proxy_rewards: _Optional[_Iterable[_Union[_tensor_pb2.RewardSpec, _Mapping]]] = ..., seed: _Optional[int] = ..., decoder: _Optional[str] = ...) -> None: ...

class PruneDecision(_message.Message):
    __slots__ = ("group_id", "step", "survivor_ids", "proxy_scores", "keep")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SURVIVOR_IDS_FIELD_NUMBER: _ClassVar[int]
    PROXY_SCORES_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    step: int
    survivor_ids: _containers.RepeatedScalarFieldContainer[int]
    proxy_scores: _containers.RepeatedScalarFieldContainer[float]
    keep: int
    def __init__(self, group_id: _Optional[str] = ..., step: _Optional[int] = ..., survivor_ids: _Optional[_Iterable[int]] = ..., proxy_scores: _Optional[_Iterable[float]] = ..., keep: _Optional[int] = ...) -> None: ...

class ListDecodersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DecoderInfo(_message.Message):
    __slots__ = ("name", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class ListDecodersResponse(_message.Message):
    __slots__ = ("decoders",)
    DECODERS_FIELD_NUMBER: _ClassVar[int]
    decoders: _containers.RepeatedCompositeFieldContainer[DecoderInfo]
    def __init__(self, decoders: _Optional[_Iterable[_Union[DecoderInfo, _Mapping]]] = ...) -> None: ...
