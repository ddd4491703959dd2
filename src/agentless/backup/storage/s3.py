"""The S3 backend: a repository under a key prefix of an S3 bucket (AWS S3, MinIO, Ceph
RGW, anything that speaks the S3 REST API), through botocore – boto3's core: boto3's
resource layer and s3transfer, which nothing here uses, took a fifth of a second to import
at every command (the floor of ``vmbackup list``).

One object per name, at key ``<prefix>/<name>``::

    put       PutObject                       atomic per object: S3 never shows a partial
                                              upload, an overwrite replaces the whole object
    get       GetObject
    get_range GetObject  Range: bytes=o-(o+n-1)   416 InvalidRange (from or past the end) = b""
    size      HeadObject                      ContentLength
    exists    HeadObject                      404 = False
    list      ListObjectsV2, every page       (1000 keys a page at most)
    list_sizes  the same, with each key's Size
    delete    DeleteObject                    S3 answers 204 for a missing key too

Errors: ``NoSuchKey`` and a bare ``404`` (HEAD has no body) are :class:`NotFound`; any
other answer, an unreachable endpoint, missing credentials are one-line
:class:`StorageError` naming the location – ``retryable`` for an unreachable endpoint, a
5xx answer, a timeout or throttling, not for the other 4xx answers (access denied, no
such bucket) nor missing credentials. botocore retries throttling, 5xx answers and
connection errors itself ("standard" mode, ``max_attempts``: within a few seconds);
:func:`~agentless.backup.storage.open_backend` wraps the backend in a RetryBackend
whose window rides out a restart of the server.

Configuration comes from the arguments, else from what botocore reads itself:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_DEFAULT_REGION`` (and ``AWS_REGION`` here), ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL``, ``~/.aws/config``. A location may name its own server and profile
(``s3://bucket/prefix?endpoint=https://host:port&profile=NAME``, :func:`s3_url_options`),
so that one process reaches two S3 clusters – a repository and its off-site copy. With
an endpoint of its own (MinIO, Ceph RGW)
requests use path-style addressing (``http://host:port/bucket/key``) unless told
otherwise, since such servers seldom have a DNS name per bucket.
"""

from __future__ import annotations

import contextlib
import os
import urllib.parse
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal, cast

import botocore.handlers
import botocore.session
import urllib3.exceptions
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from ...lifetime import Closing
from .backend import (
    InvalidName,
    NotFound,
    StorageError,
    check_name,
    check_prefix,
    check_range,
    name_is_valid,
)

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

__all__ = ["S3Backend", "parse_s3_url"]

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_TRANSIENT_CODES = {"RequestTimeout", "RequestTimeTooSkewed", "SlowDown", "Throttling", "ThrottlingException"}
AddressingStyle = Literal["auto", "virtual", "path"]
_LISTED = "AgentlessListed"  # where _take_listing puts a page's (key, size) pairs


def _take_listing(response_dict: dict[str, Any], customized_response_dict: dict[str, Any], **_: Any) -> None:
    """``before-parse`` of ListObjectsV2: the page's keys and sizes read with ElementTree
    into *customized_response_dict* (botocore adds it to the parsed page), and the body
    handed on without its ``Contents``. botocore's generic parser built a dict per key,
    ~0.03 ms a key (a third of a second to list 10 000 restore points), ElementTree
    ~0.003. ``KeyCount`` is set to the keys taken: a page that comes back without them
    (a botocore that no longer merges what this hook gives) is refused by
    :meth:`S3Backend._listed`, never read as an empty listing.

    It also does for these pages what botocore's check of every S3 answer of status 200
    does (:func:`_skip_200_check`): an error document, or a body cut short, is answered
    as a 500, which botocore retries."""
    if response_dict.get("status_code") != 200 or not response_dict.get("body"):
        return
    try:
        root = ElementTree.fromstring(response_dict["body"])
    except ElementTree.ParseError:
        response_dict["status_code"] = 500  # cut short (a dropped connection): retried
        return
    if root.tag == "Error":
        response_dict["status_code"] = 500
        return
    namespace = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    decode = root.findtext(f"{namespace}EncodingType") == "url"  # botocore asks for it
    taken: list[tuple[str, int]] = []
    contents = f"{namespace}Contents"
    for item in root.iterfind(contents):
        key, size = item.findtext(f"{namespace}Key"), item.findtext(f"{namespace}Size")
        if key is None or size is None or not size.isdigit():
            return  # not a page this hook understands: botocore parses it whole
        taken.append((urllib.parse.unquote_plus(key) if decode else key, int(size)))
    root[:] = [child for child in root if child.tag != contents]  # (one remove() a key: quadratic)
    count = root.find(f"{namespace}KeyCount")
    if count is None:
        count = ElementTree.SubElement(root, f"{namespace}KeyCount")
    count.text = str(len(taken))
    response_dict["body"] = ElementTree.tostring(root)
    customized_response_dict[_LISTED] = taken


def _skip_200_check(events: Any, operation: str) -> None:
    """botocore parses every S3 answer of status 200 whole, looking for an error document
    (``before-parse.s3.*``, registered first, so before any hook of ours): for a listing
    page that is a second full parse, as costly as :func:`_take_listing`'s, which makes
    the same check. The check is kept for every other operation. A botocore without
    that handler under this name keeps its own check: slower, never wrong."""
    check = getattr(botocore.handlers, "_handle_200_error", None)
    if check is None:
        return
    events.unregister("before-parse.s3.*", check)

    def every_other(operation_model: Any, **kwargs: Any) -> None:
        if operation_model.name != operation:
            check(operation_model=operation_model, **kwargs)

    events.register_first("before-parse.s3.*", every_other)


_URL_OPTIONS = {"endpoint": "endpoint_url", "profile": "profile"}


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")``; InvalidName if the
    URL has no bucket or the prefix breaks the naming rule. A query (the server and
    profile: :func:`s3_url_options`) is not part of the bucket or prefix."""
    if not url.startswith("s3://"):
        raise InvalidName(f"not an S3 URL: {url!r} (s3://bucket/prefix)")
    bucket, _, prefix = url[len("s3://") :].partition("?")[0].partition("/")
    prefix = prefix.strip("/")
    if not bucket or (prefix and not name_is_valid(prefix)):
        raise InvalidName(f"invalid S3 URL {url!r}: s3://bucket/prefix, prefix parts of [A-Za-z0-9._-]")
    return bucket, prefix


def s3_url_options(url: str) -> dict[str, str]:
    """The options an S3 URL names in its query – ``?endpoint=https://s3.site-b:9000``
    (the server: another S3 cluster than ``AWS_ENDPOINT_URL``'s, e.g. an off-site copy's)
    and ``&profile=NAME`` (the credentials of that profile in the AWS shared files) – as
    :class:`S3Backend` arguments; InvalidName for any other, or an endpoint that is not
    an http(s) URL. The credentials themselves never go in a URL."""
    query = url.partition("?")[2]
    found: dict[str, str] = {}
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        if name not in _URL_OPTIONS or not value or _URL_OPTIONS[name] in found:
            raise InvalidName(f"S3 URL option {name!r}: give endpoint=URL and/or profile=NAME, once each")
        found[_URL_OPTIONS[name]] = value
    endpoint = urllib.parse.urlsplit(found.get("endpoint_url", "http://x"))
    if endpoint.scheme not in ("http", "https") or not endpoint.netloc:
        raise InvalidName(f"S3 URL option endpoint={found['endpoint_url']!r}: an http(s)://host:port URL")
    return found


def _transient(error: ClientError) -> bool:
    """Whether the server's answer may change by itself: a 5xx (it is starting, failing
    over, overloaded), a timeout or throttling. Another 4xx – access denied, no such
    bucket, a bad request – stays what it is: retrying it only delays the error."""
    status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    code = str(error.response.get("Error", {}).get("Code", ""))
    return status >= 500 or status in (408, 429) or code in _TRANSIENT_CODES


class S3Backend(Closing):
    """Objects under *prefix* ("" for the whole bucket) in *bucket*, which must exist.
    Thread-safe: one botocore client, whose connection pool holds *max_pool_connections*."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        profile: str | None = None,
        addressing_style: AddressingStyle | None = None,
        max_attempts: int = 5,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        max_pool_connections: int = 16,
    ):
        prefix = prefix.strip("/")
        if not bucket or (prefix and not name_is_valid(prefix)):
            raise InvalidName(f"invalid S3 bucket {bucket!r} or prefix {prefix!r}")
        self.bucket = bucket
        self.prefix = prefix
        self.location = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self._key_prefix = f"{prefix}/" if prefix else ""
        self.endpoint_url = (
            endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        )
        if addressing_style is None:
            addressing_style = "path" if self.endpoint_url else "auto"
        config = Config(
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max_pool_connections,
            s3={"addressing_style": addressing_style},
        )
        try:
            session = botocore.session.Session(profile=profile)
            # botocore parses every listed key's LastModified with dateutil, ~0.1 ms a key
            # (a CPU-second to list 10 000 restore points); nothing here reads one: strings
            parsers = session.get_component("response_parser_factory")
            parsers.set_parser_defaults(timestamp_parser=str)
            client = session.create_client(
                "s3",
                region_name=region or os.environ.get("AWS_REGION") or None,
                endpoint_url=self.endpoint_url,
                aws_access_key_id=access_key_id,
                aws_secret_access_key=secret_access_key,
                aws_session_token=session_token,
                config=config,
            )
            client.meta.events.register("before-parse.s3.ListObjectsV2", _take_listing)
            _skip_200_check(client.meta.events, "ListObjectsV2")
            self._client = cast("S3Client", client)
        except (BotoCoreError, ValueError) as error:
            raise StorageError(f"{self.location}: cannot set up the S3 client: {error}") from None

    # ------------------------------------------------------------------ helpers

    def _key(self, name: str) -> str:
        return self._key_prefix + check_name(name)

    @contextlib.contextmanager
    def _errors(self, name: str | None, action: str) -> Iterator[None]:
        """Turn botocore's exceptions into ours, in one line."""
        where = f"{self.location}/{name}" if name else self.location
        try:
            yield
        except ClientError as error:
            info = error.response.get("Error", {})
            code = str(info.get("Code", ""))
            if name is not None and code in _NOT_FOUND:
                raise NotFound(f"{where}: no such object", name=name) from None
            if code == "NoSuchBucket":
                no_bucket = StorageError(f"{self.location}: bucket {self.bucket!r} does not exist", name=name)
                no_bucket.retryable = False
                raise no_bucket from None
            message = str(info.get("Message", "")) or str(error)
            failed = StorageError(f"{where}: cannot {action}: {code} {message}".strip(), name=name)
            failed.retryable = _transient(error)
            raise failed from None
        except NoCredentialsError:
            missing = StorageError(
                f"{self.location}: no S3 credentials: give an access key and secret "
                "or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
                name=name,
            )
            missing.retryable = False
            raise missing from None
        except (BotoCoreError, urllib3.exceptions.HTTPError) as error:
            message = f"{where}: cannot {action} (endpoint {self._client.meta.endpoint_url}): {error}"
            raise StorageError(message, name=name) from None

    # ------------------------------------------------------------------ the interface

    def put(self, name: str, data: bytes | memoryview) -> None:
        key = self._key(name)
        with self._errors(name, "store"):
            self._client.put_object(Bucket=self.bucket, Key=key, Body=bytes(data))

    def get(self, name: str) -> bytes:
        key = self._key(name)
        with self._errors(name, "read"):
            body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
            with contextlib.closing(body):
                return body.read()

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        key = self._key(name)
        check_range(offset, length)
        if length == 0:
            self.size(name)  # NotFound if missing
            return b""
        with self._errors(name, "read"):
            try:
                response = self._client.get_object(
                    Bucket=self.bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}"
                )
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") == "InvalidRange":
                    return b""  # the object exists and ends at or before offset
                raise
            with contextlib.closing(response["Body"]):
                return response["Body"].read()

    def size(self, name: str) -> int:
        key = self._key(name)
        with self._errors(name, "stat"):
            return self._client.head_object(Bucket=self.bucket, Key=key)["ContentLength"]

    def exists(self, name: str) -> bool:
        try:
            self.size(name)
        except NotFound:
            return False
        return True

    def list(self, prefix: str = "") -> Iterator[str]:
        check_prefix(prefix)
        return self._list(prefix)

    def _list(self, prefix: str) -> Iterator[str]:
        return (name for name, _size in self._listed(prefix))

    def list_sizes(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        check_prefix(prefix)
        return self._listed(prefix)

    def _listed(self, prefix: str) -> Iterator[tuple[str, int]]:
        strip = len(self._key_prefix)
        bucket, key_prefix = self.bucket, self._key_prefix + prefix
        token = ""
        with self._errors(None, "list"):
            while True:  # (botocore's paginator loads a model of its own: ~15 ms at the first)
                if token:
                    page = self._client.list_objects_v2(
                        Bucket=bucket, Prefix=key_prefix, ContinuationToken=token
                    )
                else:
                    page = self._client.list_objects_v2(Bucket=bucket, Prefix=key_prefix)
                listed = cast("list[tuple[str, int]] | None", page.get(_LISTED))
                if listed is None:  # botocore parsed the page itself
                    listed = [(item["Key"], int(item["Size"])) for item in page.get("Contents", [])]
                    if int(page.get("KeyCount", len(listed))) != len(listed):
                        raise StorageError(f"{self.location}: a listing page came without its keys")
                for key, size in listed:
                    name = key[strip:]
                    if name_is_valid(name):  # not "dir/" markers or other tools' keys
                        yield name, size
                if not page.get("IsTruncated"):
                    return
                token = page.get("NextContinuationToken", "")
                if not token:
                    raise StorageError(
                        f"{self.location}: a listing page is cut short without a token to go on"
                    )

    def delete(self, name: str) -> None:
        key = self._key(name)
        with self._errors(name, "delete"):
            self._client.delete_object(Bucket=self.bucket, Key=key)

    def close(self) -> None:
        self._client.close()
