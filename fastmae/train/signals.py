"""Preemption: SIGTERM / SIGUSR1 only set a flag; the trainer acts at the next step boundary, where
all ranks agree (all-reduce max), write a checkpoint and exit 0."""

import signal

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def install(self) -> "PreemptionFlag":
        for s in PREEMPT_SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    @property
    def raised(self) -> bool:
        return self.signum is not None

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
