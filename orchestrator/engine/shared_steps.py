"""The shared-cache side of a run: steps another machine already ran, found in their system's shared cache (the
Azure ML workspace's) while planning, used where they are or brought here only where a later step needs their
files, and the steps this run ran (or only this machine holds) saved there for the next run to find.

A failed upload costs the next run a rerun, not this run its result; a download that fails its checks is
reported and the step runs instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from orchestrator.core.cache import Cache, CacheEntry, SharedCache, SharedEntry, result_from_portable
from orchestrator.core.errors import RunFailure
from orchestrator.core.job import ModelArtifact
from orchestrator.engine.steps import INPUT_EVAL_STEP, Step


def needs_local(steps: list[Step], *, publishes: bool) -> set[str]:
    """Keys of shared-cache hits whose files must be here: the input of a step that runs, and the final model
    when it is published (`publishes`: the run has an output folder). Other hits stay where they are (a LoRA
    cached in the workspace is not downloaded when only the evaluation after the export runs)."""
    host = [s for s in steps if s.role == "host"]
    needed = {s.key for s, nxt in zip(host, host[1:], strict=False) if not nxt.cached}
    targets_run = any(s.role == "target" and s.name != INPUT_EVAL_STEP and not s.cached for s in steps)
    if host and (publishes or targets_run):
        needed.add(host[-1].key)
    return needed


class SharedSteps:
    """One run's shared-cache hits and uploads: `remote` holds the committed shared entries found while planning
    (by key), `needed` the keys whose files must be local (`needs_local`). `shared_for` names the shared cache a
    step's system keeps (None: none), `log` writes a line to a step's log."""

    def __init__(
        self, cache: Cache, shared_for: Callable[[Step], SharedCache | None], log: Callable[[Step, str], None]
    ) -> None:
        self.cache = cache
        self.shared_for = shared_for
        self.log = log
        self.remote: dict[str, SharedEntry] = {}
        self.needed: set[str] = set()

    def look_up(self, steps: list[Step]) -> None:
        """Where each planned step is cached: here ("local"), in its system's shared cache (its `where`), or
        nowhere (""): then it runs."""
        for step in steps:
            step.cached, step.where = self.cache.get(step.key) is not None, "local"
            if not step.cached:
                shared = self.shared_for(step)
                hit = shared.lookup(step.key) if shared is not None else None
                if hit is not None:
                    self.remote[step.key] = hit
                    step.cached, step.where = True, shared.where
                else:
                    step.where = ""

    def fetch(self, step: Step, model: ModelArtifact, shared: SharedCache) -> CacheEntry | None:
        """A step cached in the shared cache: used where it is (its model paths become references) unless a
        later step runs here on it, then downloaded (checked against its manifest) into the local cache. A
        download that fails its checks is reported and the step runs instead (None)."""
        remote = self.remote[step.key]
        if shared.by_reference or step.key not in self.needed:
            result = result_from_portable(remote.result, model, root=remote.uri)
            return CacheEntry(step.key, self.cache.entry_dir(step.key), result, dict(remote.meta))
        with self.cache.staging(step.key) as stage:
            try:
                shared.materialize(remote, stage)
            except RunFailure as exc:
                self.log(step, f"orch: {exc}; running {step.name} instead")
                return None
            result_from_portable(remote.result, model).write(stage)  # this run's input paths
            return self.cache.commit(step.key, stage, {**remote.meta, "from": shared.where})

    def publish(self, step: Step, entry: CacheEntry, model: ModelArtifact, shared: SharedCache) -> None:
        """A pass that ran: its entry into the shared cache (files, then the commit marker); its checkpoints
        there are dropped. A failed upload costs the next run a rerun, not this run its result."""
        try:
            committed = shared.publish(step.key, entry.path, meta=entry.meta, input_model=model)
        except Exception as exc:  # noqa: BLE001 - reported; the run goes on with its local entry
            self.log(step, f"orch: could not save {step.name} to the {shared.where} cache: {exc}")
            return
        if committed is None:
            self.log(step, f"orch: {step.name}'s result names local paths: not shared")
            return
        self.log(step, f"orch: {step.name} saved to the {shared.where} cache ({step.key[:16]})")
        with contextlib.suppress(Exception):
            shared.drop_partial(step.key)

    def share_local_entries(self, steps: list[Step], model: ModelArtifact | None) -> list[str]:
        """Steps cached on this machine only, saved into their system's shared cache (before a job that runs
        there is submitted, so it finds them too); the names of those saved. Walks the chain of inputs as a run
        would; stops where a step is not cached."""
        saved: list[str] = []
        final = model
        for step in steps:
            entry = self.cache.get(step.key)
            if entry is None and step.key not in self.remote:
                if step.role == "host":
                    break
                continue
            shared = self.shared_for(step)
            given = model if step.role == "host" else final
            if entry is not None and step.where == "local" and shared is not None:
                with contextlib.suppress(Exception):  # best effort: the job runs the step if it is not there
                    if shared.publish(step.key, entry.path, meta=entry.meta, input_model=given) is not None:
                        step.where = shared.where
                        saved.append(step.name)
            if step.role == "host":
                if entry is not None:
                    result = entry.result
                    model = result.model.with_root(entry.path) if result.model else None
                else:
                    remote = self.remote[step.key]
                    model = result_from_portable(remote.result, given, root=remote.uri).model
                final = model
                if model is None:
                    break
        return saved
