from epgrpo.protos.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Modality(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODALITY_UNSPECIFIED: _ClassVar[Modality]
    MODALITY_IMAGE: _ClassVar[Modality]
    MODALITY_VIDEO: _ClassVar[Modality]
    MODALITY_IMAGE_AND_VIDEO: _ClassVar[Modality]
MODALITY_UNSPECIFIED: Modality
MODALITY_IMAGE: Modality
MODALITY_VIDEO: Modality
MODALITY_IMAGE_AND_VIDEO: Modality

class ScoreRequest(_message.Message):
    __slots__ = ("images", "prompts", "metadata", "rewards", "request_id")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    images: _tensor_pb2.Tensor
    prompts: _containers.RepeatedScalarFieldContainer[str]
    metadata: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Metadata]
    rewards: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.RewardSpec]
    request_id: str
    def __init__(self, images: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., prompts: _Optional[_Iterable[str]] = ..., metadata: _Optional[_Iterable[_Union[_tensor_pb2.Metadata, _Mapping]]] = ..., rewards: _Optional[_Iterable[_Union[_tensor_pb2.RewardSpec, _Mapping]]] = ..., request_id: _Optional[str] = ...) -> None: ...

class RewardScores(_message.Message):
    __slots__ = ("name", "weight", "scores")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    name: str
    weight: float
    scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, name: _Optional[str] = ..., weight: _Optional[float] = ..., scores: _Optional[_Iterable[float]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores", "per_reward")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    PER_REWARD_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    per_reward: _containers.RepeatedCompositeFieldContainer[RewardScores]
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., per_reward: _Optional[_Iterable[_Union[RewardScores, _Mapping]]] = ...) -> None: ...

class ListRewardsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RewardInfo(_message.Message):
    __slots__ = ("name", "description", "inputs", "range", "group_aware", "modality")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    GROUP_AWARE_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    inputs: str
    range: str
    group_aware: bool
    modality: Modality
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., inputs: _Optional[str] = ..., range: _Optional[str] = ..., group_aware: _Optional[bool] = ..., modality: _Optional[_Union[Modality, str]] = ...) -> None: ...

class ListRewardsResponse(_message.Message):
    __slots__ = ("rewards", "wrappers")
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    WRAPPERS_FIELD_NUMBER: _ClassVar[int]
    rewards: _containers.RepeatedCompositeFieldContainer[RewardInfo]
    wrappers: _containers.RepeatedCompositeFieldContainer[RewardInfo]
    def __init__(self, rewards: _Optional[_Iterable[_Union[RewardInfo, _Mapping]]] = ..., wrappers: _Optional[_Iterable[_Union[RewardInfo, _Mapping]]] = ...) -> None: ...
