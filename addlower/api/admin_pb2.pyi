from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class CacheRequest(_message.Message):
    __slots__ = ("cache", "generation", "scope", "image")
    CACHE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    cache: str
    generation: int
    scope: str
    image: str
    def __init__(self, cache: _Optional[str] = ..., generation: _Optional[int] = ..., scope: _Optional[str] = ..., image: _Optional[str] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("key", "to_default")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TO_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    key: str
    to_default: bool
    def __init__(self, key: _Optional[str] = ..., to_default: _Optional[bool] = ...) -> None: ...

class CacheReply(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...
