"""GET /metrics: the Prometheus exposition (service/metrics.py) of this service's workdir.

A router of its own, apart from the collector, so `cbsd bmetrics` prints the same exposition
without importing FastAPI. The endpoint is a plain (sync) function: FastAPI runs it in its
thread pool, so a scrape that waits on a slow QEMU (at most the collector's short timeout)
never holds up the event loop and the API's other requests.
"""

from __future__ import annotations

import threading

from fastapi import APIRouter, FastAPI, Request, Response

from cbsd.service.metrics import CONTENT_TYPE, ServiceMetrics
from cbsd.storage.paths import Workdir, default_workdir

router = APIRouter()
_made = threading.Lock()  # two first scrapes at once must not make two tallies


def for_app(app: FastAPI) -> ServiceMetrics:
    """The app's metrics, made on first use. Its workdir is `app.state.workdir` when the app
    sets one (a Workdir), else CBSD_WORKDIR's, as every command finds it. The service's
    operations report to `for_app(app).tally.observe(op.id, op.status)`."""
    with _made:
        found = getattr(app.state, "cbsd_metrics", None)
        if found is None:
            def workdir() -> Workdir:
                wd = getattr(app.state, "workdir", None)
                return wd if isinstance(wd, Workdir) else Workdir(default_workdir())

            found = app.state.cbsd_metrics = ServiceMetrics(workdir)
    assert isinstance(found, ServiceMetrics)
    return found


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    return Response(for_app(request.app).exposition(), media_type=CONTENT_TYPE)
