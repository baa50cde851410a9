"""A real Orthanc for the archive tests (tests/test_pacs.py and the Worklist browser test).

Each fixture user gets its own Orthanc on free loopback ports with storage in a temporary folder
(:class:`boneai.pacs_server.OrthancServer`); where Orthanc or its DICOMweb plugin is not installed
(`make pacs-deps` installs them as root with apt-get), the tests skip with that reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from boneai.pacs_server import OrthancServer, orthanc_unavailable_reason


def running_orthanc(directory: Path, **options: object) -> Iterator[OrthancServer]:
    """Yield a started Orthanc in ``directory``; skip when Orthanc is not installed; stop it afterwards."""
    reason = orthanc_unavailable_reason()
    if reason:
        pytest.skip(reason)
    server = OrthancServer(directory, **options)  # type: ignore[arg-type]
    server.start()
    try:
        yield server
    finally:
        server.stop()
