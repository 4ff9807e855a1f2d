"""A refused upload leaves no copy behind.

MONAI Label's upload endpoints (``PUT /datastore/image``, ``PUT /datastore/label``, ``POST /infer/<model>`` with a
file, ``PUT /model/<name>``) copy the upload to a temp file and hand its removal to a FastAPI background task, which
runs only after a successful response. Every upload the app refuses (an unreadable or off-grid label, an image id
that exists, an image that cannot be segmented) stayed in the temp folder for good: a patient's volume, readable by
every user of the machine (mode 0644). :func:`clean_up_refused_uploads` wraps those endpoint functions so that a
request that raises runs its removals before the error goes out.

``PUT /model/<name>`` also copied any file over the model in service, in place; :func:`checked_update_model` hands
the upload to the app's ``replace_weights`` (checked, atomic) instead. ``POST /infer/<model>?output=dicom_seg`` is
refused before the inference runs (:func:`refusing_dicom_seg_output`).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import BackgroundTasks, HTTPException, UploadFile
from monailabel.utils.others.generic import file_checksum, remove_file

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


def refusing_dicom_seg_output(run_inference: Callable[..., Any]) -> Callable[..., Any]:
    """``POST /infer/<model>?output=dicom_seg``: MONAI Label writes a DICOM SEG only for its own DICOMweb datastore,
    and said so after the inference had run, with a 500 (the result file left in the temp folder); a 422 saying
    what to ask for instead comes before it."""
    if getattr(run_inference, "refuses_dicom_seg", False):
        return run_inference
    signature = inspect.signature(run_inference)

    @functools.wraps(run_inference)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from monailabel.datastore.dicom import DICOMWebDatastore
        from monailabel.interfaces.utils.app import app_instance

        output = signature.bind_partial(*args, **kwargs).arguments.get("output")
        if getattr(output, "value", output) == "dicom_seg" and \
                not isinstance(app_instance().datastore(), DICOMWebDatastore):
            raise HTTPException(status_code=422, detail=(
                "output=dicom_seg: this server writes no DICOM SEG in an infer response; ask for output=image (the "
                "label on the image's grid, NIfTI or NRRD) or output=all; a label saved with PUT /datastore/label "
                "goes to the PACS as DICOM SEG when the server runs on one"))
        return run_inference(*args, **kwargs)

    wrapper.refuses_dicom_seg = True  # type: ignore[attr-defined]
    return wrapper


def checked_update_model(background_tasks: BackgroundTasks, model: str, file: UploadFile) -> dict[str, Any]:
    """``PUT /model/<model>`` as upstream answers it (checksum and time of the model file), the upload handed to
    the app's ``replace_weights(model, path) -> published path`` (which checks it and copies it atomically)."""
    from monailabel.interfaces.app import MONAILabelApp
    from monailabel.interfaces.utils.app import app_instance

    ext = "".join(Path(file.filename).suffixes) if file.filename else ".pt"
    fd, upload = tempfile.mkstemp(suffix=ext)
    with os.fdopen(fd, "wb") as buffer:
        shutil.copyfileobj(file.file, buffer)
    background_tasks.add_task(remove_file, upload)
    instance: MONAILabelApp = app_instance()
    published = instance.replace_weights(model, upload)
    return {"checksum": file_checksum(published), "modified_time": int(os.stat(published).st_mtime)}


def clean_up_refused_uploads() -> None:
    """Wrap MONAI Label's upload endpoints (:data:`ENDPOINTS`) in :func:`removing_uploads_on_error`, ``PUT /model``'s
    replaced by :func:`checked_update_model`; idempotent. The routes look the functions up by name when a request
    comes, so this works once the server has started."""
    for module_name, name in ENDPOINTS:
        module = importlib.import_module(module_name)
        endpoint = checked_update_model if name == "update_model" else getattr(module, name)
        if name == "run_inference":
            endpoint = refusing_dicom_seg_output(endpoint)
        setattr(module, name, removing_uploads_on_error(endpoint))
