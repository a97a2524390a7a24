"""C-STORE SCU (pynetdicom): send the agent's DICOM objects to a PACS or a scanner console.

One association per batch, with a presentation context per SOP class and transfer syntax of the
files. What is transient and retried from the outbox (scanside.agent.outputs.dicom_out.DicomSink): no connection,
association rejected or aborted, timeouts, no response, status "out of resources" (0xA7xx) and any
status this code does not know. What is permanent for that object: an association rejected-permanent (a wrong called or calling AE
title: the peer says the same request will be refused again), status 0xA9xx (data set does not
match the SOP class), 0xCxxx (cannot understand), 0x0122 (SOP class not supported), 0x0124 (not
authorised) - the receiver would refuse the same object again. Warnings (0xB000, 0xB006, 0xB007)
count as stored. Re-sending an object is harmless: its SOP Instance UID is fixed.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import pydicom
from pynetdicom import AE, build_context

from scanside.agent.runtime.config import DicomSendConfig

log = logging.getLogger(__name__)

SUCCESS = {0x0000, 0xB000, 0xB006, 0xB007}


class TransientSendError(Exception):
    pass


class PermanentSendError(Exception):
    pass


def classify_status(status: int) -> str:
    """'ok', 'permanent' or 'transient' for a C-STORE response status."""
    if status in SUCCESS:
        return "ok"
    if (status & 0xFF00) in (0xA900,) or (status & 0xF000) == 0xC000 or status in (0x0122, 0x0124):
        return "permanent"
    return "transient"


class DicomSender:
    def __init__(self, config: DicomSendConfig):
        self.config = config

    def _ae(self) -> AE:
        ae = AE(ae_title=self.config.calling_ae)
        ae.connection_timeout = self.config.connect_timeout_s
        ae.acse_timeout = self.config.acse_timeout_s
        ae.dimse_timeout = self.config.dimse_timeout_s
        ae.network_timeout = self.config.network_timeout_s
        return ae

    def send(self, paths: Sequence[Path]) -> list[int]:
        """Store every file; the status of each. Raises TransientSendError or PermanentSendError."""
        if not paths:
            return []
        datasets = []
        for p in paths:
            try:
                datasets.append(pydicom.dcmread(p))
            except (OSError, pydicom.errors.InvalidDicomError) as exc:
                raise PermanentSendError(f"cannot read {Path(p).name}: {type(exc).__name__}") from exc
        wanted: dict[tuple[str, str], None] = {}
        for ds in datasets:
            wanted[(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))] = None
        contexts = [build_context(sop, [ts]) for sop, ts in wanted]
        ae = self._ae()
        assoc = ae.associate(self.config.host, self.config.port, contexts=contexts, ae_title=self.config.called_ae)
        if not assoc.is_established:
            where = f"{self.config.called_ae}@{self.config.host}:{self.config.port}"
            rsp = getattr(assoc.acceptor, "primitive", None) if assoc.is_rejected else None
            if rsp is not None and getattr(rsp, "result", None) == 0x01:
                # rejected-permanent (wrong called/calling AE title, unsupported protocol): the same
                # request is refused until someone changes a configuration, so retrying cannot help
                raise PermanentSendError(f"association with {where} rejected permanently: "
                                         f"{rsp.reason_str} (our AE {self.config.calling_ae!r})")
            why = "rejected (transient)" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
            raise TransientSendError(f"association with {where} {why}")
        statuses: list[int] = []
        permanent: list[str] = []
        try:
            accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts}
            for p, ds in zip(paths, datasets):
                if (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) not in accepted:
                    # the receiver declined this SOP class / transfer syntax: it will not take it later either
                    permanent.append(f"{Path(p).name}: presentation context not accepted")
                    continue
                rsp = assoc.send_c_store(ds)
                if not rsp or "Status" not in rsp:
                    raise TransientSendError(f"no C-STORE response for {Path(p).name} (timeout or aborted)")
                status = int(rsp.Status)
                statuses.append(status)
                kind = classify_status(status)
                if kind == "transient":
                    raise TransientSendError(f"C-STORE of {Path(p).name} answered 0x{status:04X}")
                if kind == "permanent":
                    permanent.append(f"{Path(p).name}: 0x{status:04X}")
        except (RuntimeError, ValueError) as exc:  # pynetdicom: no accepted context for the object, ...
            raise TransientSendError(f"C-STORE failed: {exc}") from exc
        finally:
            if assoc.is_established:
                assoc.release()
        if permanent:
            raise PermanentSendError("receiver refused " + ", ".join(permanent))
        log.info("C-STORE: %d object(s) stored at %s", len(statuses), self.config.called_ae)
        return statuses
