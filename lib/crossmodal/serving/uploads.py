"""A refused upload leaves no copy behind.

MONAI Label's upload endpoints (``PUT /datastore/image``, ``PUT /datastore/label``, ``POST /infer/<model>`` with a
file, ``PUT /model/<name>``) copy the upload to a temp file and hand its removal to a FastAPI background task, which
runs only after a successful response. Every upload the app refuses (an unreadable or off-grid label, an image id
that exists, an image that cannot be segmented) stayed in the temp folder for good: a patient's volume, readable by
every user of the machine (mode 0644). :func:`clean_up_refused_uploads` wraps those endpoint functions so that a
request that raises runs its removals before the error goes out.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

from fastapi import BackgroundTasks
from monailabel.utils.others.generic import remove_file

ENDPOINTS = (("monailabel.endpoints.datastore", "add_image"), ("monailabel.endpoints.datastore", "save_label"),
             ("monailabel.endpoints.infer", "run_inference"), ("monailabel.endpoints.model", "update_model"))
"""(module, function): each takes the request's ``BackgroundTasks`` first; its ``api_*`` route calls it by name."""


def removing_uploads_on_error(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """``endpoint`` whose queued ``remove_file`` tasks (its upload's temp copies) also run when it raises."""
    if getattr(endpoint, "removes_uploads_on_error", False):
        return endpoint

    @functools.wraps(endpoint)
    def wrapper(background_tasks: BackgroundTasks, *args: Any, **kwargs: Any) -> Any:
        try:
            return endpoint(background_tasks, *args, **kwargs)
        except BaseException:
            for task in background_tasks.tasks:
                if task.func is remove_file:
                    remove_file(*task.args, **task.kwargs)
            raise

    wrapper.removes_uploads_on_error = True  # type: ignore[attr-defined]
    return wrapper


def clean_up_refused_uploads() -> None:
    """Wrap MONAI Label's upload endpoints (:data:`ENDPOINTS`) in :func:`removing_uploads_on_error`; idempotent. The
    routes look the functions up by name when a request comes, so this works once the server has started."""
    for module_name, name in ENDPOINTS:
        module = importlib.import_module(module_name)
        setattr(module, name, removing_uploads_on_error(getattr(module, name)))
