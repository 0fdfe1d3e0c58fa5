"""Reading and writing ``s3://`` objects (MinIO, moto or AWS) through boto3, and local paths alike."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from dl_uncertainty.errors import UserError

# ---------------------------------------------------------------- reading raw data


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None


def _s3_client():
    try:
        return _cached_s3_client(_endpoint(), os.environ.get("AWS_ACCESS_KEY_ID"), os.getpid())
    except ValueError as err:  # botocore: "Invalid endpoint: ..."
        raise UserError(f"{err}; set AWS_ENDPOINT_URL (or MLFLOW_S3_ENDPOINT_URL) to http(s)://<host>:<port>") from None


def s3_error(action: str, uri: str, err: Exception) -> UserError:
    """A boto3 failure as one sentence saying what to fix."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    where = _endpoint() or "AWS"
    if isinstance(err, NoCredentialsError):
        return UserError(f"cannot {action} {uri}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if isinstance(err, EndpointConnectionError):
        return UserError(f"cannot {action} {uri}: no S3 server answers at {where}; start it, or set AWS_ENDPOINT_URL")
    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            return UserError(f"cannot {action} {uri}: the S3 server at {where} refuses these credentials ({code}); "
                             "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        if status and status >= 500:
            return UserError(f"cannot {action} {uri}: the S3 server at {where} failed (HTTP {status}); "
                             "try again, or check the server")
        if code == "NoSuchBucket":
            return UserError(f"cannot {action} {uri}: there is no bucket {split_s3_uri(uri)[0]!r} at {where}")
    return UserError(f"cannot {action} {uri}: {err}")


@functools.lru_cache(maxsize=4)
def _cached_s3_client(endpoint: str | None, _key_id: str | None, _pid: int):
    # one client per endpoint, credentials and process (DataLoader workers get their own):
    # making a client costs more than reading one small image
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


def split_s3_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket or not key:
        raise UserError(f"{uri!r} is not an s3://bucket/key URI")
    return bucket, key


def read_bytes(path: str) -> bytes:
    """Bytes of a local file or an ``s3://bucket/key`` object."""
    if path.startswith("s3://"):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_s3_uri(path)
        client = _s3_client()
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except (BotoCoreError, ClientError) as err:
            if isinstance(err, ClientError) and err.response.get("Error", {}).get("Code") == "NoSuchKey":
                raise _missing_key(client, bucket, key) from None
            raise s3_error("read", path, err) from None
    if "://" in path:
        raise UserError(f"cannot read {path}: only local paths and s3://bucket/key URIs are read; download it first")
    file = Path(path)
    if local_kind(path) == "folder":
        raise UserError(f"{path} is a folder, not a file")
    if local_kind(path) != "file":
        raise UserError(f"data file not found: {path}" + (" (a symbolic link to nothing, or a loop of links)"
                                                          if file.is_symlink() else ""))
    try:
        return file.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror or err})") from None


def _missing_key(client, bucket: str, key: str) -> UserError:
    """No object at ``key``: a "folder" (a prefix other keys start with) or nothing at all."""
    folder = key.rstrip("/") + "/"
    try:
        inside = client.list_objects_v2(Bucket=bucket, Prefix=folder, MaxKeys=1).get("KeyCount", 0)
    except Exception:  # noqa: BLE001 -- only to phrase the error; reading failed already
        inside = 0
    if inside:
        return UserError(f"s3://{bucket}/{key} is a folder, not a file; give a file's key (s3://{bucket}/{folder}<file>), "
                         "or data=image_folder for a folder of class folders")
    return UserError(f"cannot read s3://{bucket}/{key}: there is no such key in bucket {bucket!r}")


def local_kind(path: str) -> str:
    """"file", "folder" or "missing"; a path the system refuses (a name too long) is an error naming it."""
    try:
        return "folder" if Path(path).is_dir() else "file" if Path(path).is_file() else "missing"
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror or err}); check data.path") from None


def upload_file(local: str, uri: str) -> None:
    """Put a local file at ``s3://bucket/key`` (e.g. MinIO's ``datasets`` bucket)."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    if not Path(local).is_file():
        raise UserError(f"file not found: {local}")
    bucket, key = split_s3_uri(uri)
    try:
        _s3_client().upload_file(local, bucket, key)
    except (BotoCoreError, ClientError, Boto3Error) as err:
        raise s3_error(f"upload {local} to", uri, err) from None
