from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTION_UNSPECIFIED: _ClassVar[Action]
    RETRY_IN_PLACE: _ClassVar[Action]
    RESTART_PROCESSES: _ClassVar[Action]
    REPLACE_POD: _ClassVar[Action]
    REPLACE_NODE: _ClassVar[Action]
    FAIL_JOB: _ClassVar[Action]
ACTION_UNSPECIFIED: Action
RETRY_IN_PLACE: Action
RESTART_PROCESSES: Action
REPLACE_POD: Action
REPLACE_NODE: Action
FAIL_JOB: Action

class AgentMessage(_message.Message):
    __slots__ = ("hello", "heartbeat", "failure")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    heartbeat: Heartbeat
    failure: FailureReport
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., failure: _Optional[_Union[FailureReport, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("namespace", "job", "pod", "node", "first_rank", "rank_count", "agent_version")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    FIRST_RANK_FIELD_NUMBER: _ClassVar[int]
    RANK_COUNT_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    job: str
    pod: str
    node: str
    first_rank: int
    rank_count: int
    agent_version: str
    def __init__(self, namespace: _Optional[str] = ..., job: _Optional[str] = ..., pod: _Optional[str] = ..., node: _Optional[str] = ..., first_rank: _Optional[int] = ..., rank_count: _Optional[int] = ..., agent_version: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("seq", "step", "step_time_s", "sent_unix_ns", "step_unix_ns", "regrouping", "ranks")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_S_FIELD_NUMBER: _ClassVar[int]
    SENT_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    STEP_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    REGROUPING_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    step: int
    step_time_s: float
    sent_unix_ns: int
    step_unix_ns: int
    regrouping: bool
    ranks: _containers.RepeatedCompositeFieldContainer[RankTiming]
    def __init__(self, seq: _Optional[int] = ..., step: _Optional[int] = ..., step_time_s: _Optional[float] = ..., sent_unix_ns: _Optional[int] = ..., step_unix_ns: _Optional[int] = ..., regrouping: _Optional[bool] = ..., ranks: _Optional[_Iterable[_Union[RankTiming, _Mapping]]] = ...) -> None: ...

class RankTiming(_message.Message):
    __slots__ = ("rank", "step", "window", "step_s", "wait_s", "sections", "busy_median_s", "median_window", "busy_first_step", "busy_steps")
    class SectionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    STEP_S_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    SECTIONS_FIELD_NUMBER: _ClassVar[int]
    BUSY_MEDIAN_S_FIELD_NUMBER: _ClassVar[int]
    MEDIAN_WINDOW_FIELD_NUMBER: _ClassVar[int]
    BUSY_FIRST_STEP_FIELD_NUMBER: _ClassVar[int]
    BUSY_STEPS_FIELD_NUMBER: _ClassVar[int]
    rank: int
    step: int
    window: int
    step_s: float
    wait_s: float
    sections: _containers.ScalarMap[str, float]
    busy_median_s: float
    median_window: int
    busy_first_step: int
    busy_steps: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, rank: _Optional[int] = ..., step: _Optional[int] = ..., window: _Optional[int] = ..., step_s: _Optional[float] = ..., wait_s: _Optional[float] = ..., sections: _Optional[_Mapping[str, float]] = ..., busy_median_s: _Optional[float] = ..., median_window: _Optional[int] = ..., busy_first_step: _Optional[int] = ..., busy_steps: _Optional[_Iterable[float]] = ...) -> None: ...

class ProcessExit(_message.Message):
    __slots__ = ("exit_code", "signal")
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    exit_code: int
    signal: int
    def __init__(self, exit_code: _Optional[int] = ..., signal: _Optional[int] = ...) -> None: ...

class TrainingException(_message.Message):
    __slots__ = ("type", "message", "traceback")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TRACEBACK_FIELD_NUMBER: _ClassVar[int]
    type: str
    message: str
    traceback: str
    def __init__(self, type: _Optional[str] = ..., message: _Optional[str] = ..., traceback: _Optional[str] = ...) -> None: ...

class FailureReport(_message.Message):
    __slots__ = ("seq", "rank", "exit", "exception", "log_tail", "observed_unix_ns", "round_started_unix_ns")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    EXCEPTION_FIELD_NUMBER: _ClassVar[int]
    LOG_TAIL_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    ROUND_STARTED_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    rank: int
    exit: ProcessExit
    exception: TrainingException
    log_tail: _containers.RepeatedScalarFieldContainer[str]
    observed_unix_ns: int
    round_started_unix_ns: int
    def __init__(self, seq: _Optional[int] = ..., rank: _Optional[int] = ..., exit: _Optional[_Union[ProcessExit, _Mapping]] = ..., exception: _Optional[_Union[TrainingException, _Mapping]] = ..., log_tail: _Optional[_Iterable[str]] = ..., observed_unix_ns: _Optional[int] = ..., round_started_unix_ns: _Optional[int] = ...) -> None: ...

class OperatorMessage(_message.Message):
    __slots__ = ("welcome", "ack", "command")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    ack: Ack
    command: Command
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., command: _Optional[_Union[Command, _Mapping]] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("action", "delay_s", "reason")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    DELAY_S_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    action: Action
    delay_s: float
    reason: str
    def __init__(self, action: _Optional[_Union[Action, str]] = ..., delay_s: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("session_id", "heartbeat_interval_s")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    heartbeat_interval_s: float
    def __init__(self, session_id: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("seq", "verdict")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    seq: int
    verdict: Verdict
    def __init__(self, seq: _Optional[int] = ..., verdict: _Optional[_Union[Verdict, _Mapping]] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("seq", "restart", "kill")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RESTART_FIELD_NUMBER: _ClassVar[int]
    KILL_FIELD_NUMBER: _ClassVar[int]
    seq: int
    restart: RestartProcesses
    kill: KillWorker
    def __init__(self, seq: _Optional[int] = ..., restart: _Optional[_Union[RestartProcesses, _Mapping]] = ..., kill: _Optional[_Union[KillWorker, _Mapping]] = ...) -> None: ...

class KillWorker(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class RestartProcesses(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...
