"""A refused upload leaves no copy behind; a malformed request is a 4xx that says what is wrong.

MONAI Label's upload endpoints (``PUT /datastore/image``, ``PUT /datastore/label``, ``POST /infer/<model>`` with a
file, ``PUT /model/<name>``) copy the upload to a temp file and hand its removal to a FastAPI background task, which
runs only after a successful response. Every upload the app refuses (an unreadable or off-grid label, an image id
that exists, an image that cannot be segmented) stayed in the temp folder for good: a patient's volume, readable by
every user of the machine (mode 0644). :func:`check_requests` wraps those endpoint functions so that a
request that raises runs its removals before the error goes out.

``PUT /model/<name>`` also copied any file over the model in service, in place; :func:`checked_update_model` hands
the upload to the app's ``replace_weights`` (checked, atomic) instead. ``DELETE /model/<name>`` moved the app's
committed weights away when nothing had been trained (:func:`checked_delete_model`). ``POST /infer/<model>`` with
``output=dicom_seg`` is refused before the inference runs (:func:`refusing_dicom_seg_output`). A ``params`` /
``info`` form field that is not a JSON object was a 500 from MONAI Label's ``json.loads`` (:func:`checking_json_form`).
Scribbles sent as OHIF's ``.bin`` (raw uint8 on the image's grid) left their converted NIfTI in the temp folder on
every request, and a ``.bin`` of another size was a 500 (:func:`converting_bin_labels`). An asynchronous
``POST /scoring/<method>`` of an unknown method was queued and failed out of sight (:func:`checking_scoring_method`).
Reading the infos of a case or label that is not there answered ``{}`` 200 (:func:`checked_get_image_info`).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from crossmodal.io import CaseError
from fastapi import BackgroundTasks, HTTPException, UploadFile
from monailabel.datastore.utils.convert import binary_to_image
from monailabel.utils.others.generic import file_checksum, remove_file

ENDPOINTS = (("monailabel.endpoints.datastore", "add_image"), ("monailabel.endpoints.datastore", "save_label"),
             ("monailabel.endpoints.infer", "run_inference"), ("monailabel.endpoints.model", "update_model"))
"""(module, function): each takes the request's ``BackgroundTasks`` first; its ``api_*`` route calls it by name."""

JSON_FORMS = (("monailabel.endpoints.datastore", "add_image", "params"),
              ("monailabel.endpoints.datastore", "save_label", "params"),
              ("monailabel.endpoints.datastore", "update_image_info", "info"),
              ("monailabel.endpoints.datastore", "update_label_info", "info"),
              ("monailabel.endpoints.infer", "run_inference", "params"))
"""(module, function, form field): the endpoints that ``json.loads`` a form field and use it as a dict."""


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


class _NotJSON(ValueError):
    """A NaN / Infinity constant, which Python's ``json`` reads and JSON does not have."""


def _refuse_constant(name: str) -> Any:
    raise _NotJSON(name)


def checking_json_form(endpoint: Callable[..., Any], field: str) -> Callable[..., Any]:
    """``endpoint`` whose form field ``field`` (``params`` or ``info``) must be a JSON object: a 422 naming the image
    and what came, before the endpoint reads anything (MONAI Label's ``json.loads`` made ``{bad`` or ``[1]`` a 500)."""
    if field in getattr(endpoint, "checked_json_forms", ()):
        return endpoint
    signature = inspect.signature(endpoint)

    @functools.wraps(endpoint)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        arguments = signature.bind_partial(*args, **kwargs).arguments
        value = arguments.get(field)
        if isinstance(value, str) and value:
            fix = f"send a JSON object, e.g. {field}={{\"key\": \"value\"}} (or {{}})"
            try:
                problem = None if isinstance(json.loads(value, parse_constant=_refuse_constant), dict) \
                    else "is JSON but not an object"
            except _NotJSON as e:  # stored in an info, it made the datastore's listing a 500
                problem, fix = f"holds {e}, which JSON does not have", "send a number or null"
            except json.JSONDecodeError as e:
                problem = f"is not JSON ({e})"
            if problem:
                image = next((v for k in ("image", "label") if isinstance(v := arguments.get(k), str) and v), None)
                subject = f"image {image!r}" if image else "the request"
                raise HTTPException(status_code=422, detail=(
                    f"{subject}: the form field `{field}` {problem}: {value[:80]!r}; {fix}"))
        return endpoint(*args, **kwargs)

    wrapper.checked_json_forms = (*getattr(endpoint, "checked_json_forms", ()), field)  # type: ignore[attr-defined]
    return wrapper


def converting_bin_labels(run_inference: Callable[..., Any]) -> Callable[..., Any]:
    """``POST /infer/<model>`` with a ``label`` upload named ``*.bin`` (OHIF's scribbles: one uint8 a voxel of the
    datastore image's grid, Fortran order; on a PACS, of the series ``image`` names): converted here with MONAI
    Label's ``binary_to_image`` and passed on as a NIfTI upload, the conversion removed after the request (upstream's
    stayed in the temp folder on every request).
    A ``.bin`` without an image id or of another size than the image is a 422 saying so (was a 500)."""
    if getattr(run_inference, "converts_bin_labels", False):
        return run_inference
    signature = inspect.signature(run_inference)

    @functools.wraps(run_inference)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from monailabel.interfaces.utils.app import app_instance

        bound = signature.bind(*args, **kwargs)
        label, image = bound.arguments.get("label"), bound.arguments.get("image")
        if label is None or not isinstance(getattr(label, "filename", None), str) or \
                not label.filename.endswith(".bin"):
            return run_inference(*bound.args, **bound.kwargs)
        name = Path(label.filename).name
        if not image:
            raise HTTPException(status_code=422, detail=(
                f"label {name}: a .bin label takes its grid from a datastore image; name it with `image` "
                "(or send the label as NIfTI / NRRD)"))
        store = app_instance().datastore()
        try:
            uri = store.get_image_uri(image)
        except CaseError as e:  # the case's own files (a PACS's series) do not read
            raise HTTPException(status_code=422, detail=str(e)) from e
        if not uri:
            raise HTTPException(status_code=404, detail=f"case {image!r}: no such image in the datastore")
        grid = store.viewer_grid(image) if hasattr(store, "viewer_grid") else None
        if grid is not None:  # drawn in a viewport showing a secondary series (PACS): on that series' grid
            uri = grid[1]
        fd, raw = tempfile.mkstemp(suffix=".bin")
        converted = None
        try:
            with os.fdopen(fd, "wb") as buffer:
                shutil.copyfileobj(label.file, buffer)
            try:
                converted = binary_to_image(uri, raw)
            except ValueError as e:
                raise HTTPException(status_code=422, detail=(
                    f"case {image!r}: the label {name} ({os.path.getsize(raw)} bytes) is not one uint8 a "
                    f"voxel of the image's grid ({e}); send it on the grid of the image the viewer shows, or as "
                    "NIfTI / NRRD")) from e
            with open(converted, "rb") as nifti:
                bound.arguments["label"] = UploadFile(nifti, filename=Path(name).stem + ".nii.gz")
                return run_inference(*bound.args, **bound.kwargs)
        finally:
            for path in (raw, converted):
                if path:
                    remove_file(path)

    wrapper.converts_bin_labels = True  # type: ignore[attr-defined]
    return wrapper


def checking_scoring_method(run_method: Callable[..., Any]) -> Callable[..., Any]:
    """``POST /scoring/<method>``: an unknown method is a 404 listing the served ones, and a bad option a 422 (the
    app's ``check_scoring``), before MONAI Label queues it (an asynchronous request was answered 200 and its
    background task failed out of sight)."""
    if getattr(run_method, "checks_scoring_method", False):
        return run_method

    @functools.wraps(run_method)
    def wrapper(method: str, params: dict | None = None, *args: Any, **kwargs: Any) -> Any:
        from crossmodal.serving.app import not_served
        from monailabel.interfaces.utils.app import app_instance

        instance = app_instance()
        served = instance.info().get("scoring", {})
        if method not in served:
            raise not_served("scoring method", method, served)
        check = getattr(instance, "check_scoring", None)
        if check is not None:  # the request as MONAI Label's task runner merges it
            check({"method": method, **instance.info().get("config", {}).get("scoring", {}), **(params or {})})
        return run_method(method, params, *args, **kwargs)

    wrapper.checks_scoring_method = True  # type: ignore[attr-defined]
    return wrapper


def checking_train_request(run_model: Callable[..., Any]) -> Callable[..., Any]:
    """``POST /train/<model>``: the request (the model, the app's train config and the params, merged as MONAI
    Label's task runner merges them) checked by the app's ``check_train`` before it is queued: a bad option was
    answered 200 "SUBMITTED" and failed in the background process, seen only in the task's status."""
    if getattr(run_model, "checks_train_request", False):
        return run_model

    @functools.wraps(run_model)
    def wrapper(model: str, params: dict | None = None, *args: Any, **kwargs: Any) -> Any:
        from monailabel.interfaces.utils.app import app_instance

        instance = app_instance()
        check = getattr(instance, "check_train", None)
        if check is not None and model:
            instance.bundle_path(model)  # an unknown model: its 404 first
            check({"model": model, **instance.info().get("config", {}).get("train", {}), **(params or {})})
        return run_model(model, params, *args, **kwargs)

    wrapper.checks_train_request = True  # type: ignore[attr-defined]
    return wrapper


def checking_batch_infer(run: Callable[..., Any]) -> Callable[..., Any]:
    """``POST /batch/infer/<model>``: the request checked by the app's ``check_batch_infer`` before MONAI Label
    queues it (a bad option was answered 200 "SUBMITTED", and every case failed in the background with it)."""
    if getattr(run, "checks_batch_infer", False):
        return run

    @functools.wraps(run)
    def wrapper(model: str, images: Any = None, params: dict | None = None, *args: Any, **kwargs: Any) -> Any:
        from monailabel.interfaces.utils.app import app_instance

        instance = app_instance()
        check = getattr(instance, "check_batch_infer", None)
        if check is not None:
            check({"model": model, "images": images,
                   **instance.info().get("config", {}).get("batch_infer", {}), **(params or {})})
        return run(model, images, params, *args, **kwargs)

    wrapper.checks_batch_infer = True  # type: ignore[attr-defined]
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


def checked_delete_model(model: str) -> dict[str, Any]:
    """``DELETE /model/<model>`` handed to the app's ``delete_weights(model)``: the trained weights aside, the shipped
    ones never (upstream moved the app's committed weights away when nothing had been trained)."""
    from monailabel.interfaces.app import MONAILabelApp
    from monailabel.interfaces.utils.app import app_instance

    instance: MONAILabelApp = app_instance()
    return instance.delete_weights(model)


def checked_get_image_info(image: str) -> dict[str, Any]:
    """``GET /datastore/image/info``: a case the datastore does not hold is a 404 naming it, as ``PUT`` answers
    (MONAI Label answered ``{}`` 200, the same as a case without infos)."""
    from crossmodal.serving.datastore import no_such_case
    from monailabel.interfaces.utils.app import app_instance

    datastore = app_instance().datastore()
    info = datastore.get_image_info(image)
    if not info and image not in datastore.list_images():
        raise no_such_case(image)
    return info


def checked_get_label_info(label: str, tag: str) -> dict[str, Any]:
    """``GET /datastore/label/info``: a case, or a label tag of a case, that is not there is a 404 naming it
    (MONAI Label answered ``{}`` 200)."""
    from crossmodal.serving.datastore import no_such_case, no_such_label
    from monailabel.interfaces.utils.app import app_instance

    datastore = app_instance().datastore()
    info = datastore.get_label_info(label, tag)
    if not info:
        if label not in datastore.list_images():
            raise no_such_case(label)
        tags = list(datastore.get_labels_by_image_id(label))
        if tag not in tags:
            raise no_such_label(label, tag, tags)
    return info


def check_requests() -> None:
    """Wrap MONAI Label's endpoints: the form fields of :data:`JSON_FORMS` checked (:func:`checking_json_form`),
    ``.bin`` labels converted (:func:`converting_bin_labels`), scoring, train and batch infer requests checked
    before they are queued (:func:`checking_scoring_method`, :func:`checking_train_request`,
    :func:`checking_batch_infer`), the upload endpoints (:data:`ENDPOINTS`) in :func:`removing_uploads_on_error`,
    ``PUT /model``'s replaced by :func:`checked_update_model` and ``DELETE /model``'s by :func:`checked_delete_model`,
    the info reads by :func:`checked_get_image_info` and :func:`checked_get_label_info`; idempotent. The routes look
    the functions up by name when a request comes, so this works once the server has started."""
    for module_name, name, field in JSON_FORMS:
        module = importlib.import_module(module_name)
        setattr(module, name, checking_json_form(getattr(module, name), field))
    importlib.import_module("monailabel.endpoints.model").delete_model = checked_delete_model  # type: ignore
    datastore = importlib.import_module("monailabel.endpoints.datastore")
    for name, checked in (("get_image_info", checked_get_image_info), ("get_label_info", checked_get_label_info)):
        setattr(datastore, name, checked)
    scoring = importlib.import_module("monailabel.endpoints.scoring")
    scoring.run_method = checking_scoring_method(scoring.run_method)  # type: ignore[attr-defined]
    batch = importlib.import_module("monailabel.endpoints.batch_infer")
    batch.run = checking_batch_infer(batch.run)  # type: ignore[attr-defined]
    train = importlib.import_module("monailabel.endpoints.train")
    train.run_model = checking_train_request(train.run_model)  # type: ignore[attr-defined]
    for module_name, name in ENDPOINTS:
        module = importlib.import_module(module_name)
        endpoint = checked_update_model if name == "update_model" else getattr(module, name)
        if name == "run_inference":
            endpoint = refusing_dicom_seg_output(converting_bin_labels(endpoint))
        setattr(module, name, removing_uploads_on_error(endpoint))
