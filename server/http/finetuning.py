"""Routes of files and fine-tuning jobs: ``/v1/files`` and ``/v1/fine_tuning/jobs``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response

from .context import Ctx, Tenant
from .errors import HttpError
from .schemas import FineTuningJobRequest

router = APIRouter()


@router.post("/v1/files")
async def upload_file(file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()],
                      ctx: Ctx, who: Tenant):
    # The body-size middleware already refused uploads over the limit.
    data = await file.read()
    return await ctx.files.create(who, file.filename or "upload.jsonl", purpose, data)


@router.get("/v1/files")
async def list_files(ctx: Ctx, who: Tenant, purpose: str | None = None,
                     limit: Annotated[int, Query(ge=1)] = 10000):
    files = ctx.files.list(who, purpose)
    return {"object": "list", "data": files[:limit], "has_more": len(files) > limit}


@router.get("/v1/files/{file_id}")
async def get_file(file_id: str, ctx: Ctx,
                   who: Tenant):
    return ctx.files.get(who, file_id)


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, ctx: Ctx,
                       who: Tenant):
    return Response(ctx.files.content(who, file_id), media_type="application/jsonl")


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, ctx: Ctx,
                      who: Tenant):
    for job in ctx.jobs.jobs.values():
        if job.tenant == who and job.training_file == file_id and job.finished_at is None:
            raise HttpError(409, f"file_id: {file_id!r} is the training file of job "
                            f"{job.id}, which has not finished", "file_id", "file_in_use")
    return ctx.files.delete(who, file_id)


@router.post("/v1/fine_tuning/jobs")
async def create_job(body: FineTuningJobRequest, ctx: Ctx,
                     who: Tenant):
    return await ctx.jobs.create(who, body)


@router.get("/v1/fine_tuning/jobs")
async def list_jobs(ctx: Ctx, who: Tenant, after: str | None = None, limit: int = 20):
    return await ctx.jobs.list(who, after, limit)


@router.get("/v1/fine_tuning/jobs/{job_id}")
async def get_job(job_id: str, ctx: Ctx,
                  who: Tenant):
    return await ctx.jobs.job(who, job_id)


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, ctx: Ctx,
                     who: Tenant):
    return await ctx.jobs.cancel(who, job_id)


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
async def job_events(ctx: Ctx, who: Tenant, job_id: str, after: str | None = None,
                     limit: int = 20):
    return await ctx.jobs.events(who, job_id, after, limit)


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
async def job_checkpoints(ctx: Ctx, who: Tenant, job_id: str, after: str | None = None,
                          limit: int = 10):
    return await ctx.jobs.checkpoints(who, job_id, after, limit)
