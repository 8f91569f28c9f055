"""The one Hub folder resolver of the package (private), with one offline message.

A source is a local folder or a Hub repo id (``owner/name``). For a repo, :class:`HubFiles` asks the Hub once for
the repo's file list (``HfApi.model_info``: a single request, no retry loop) and then downloads only the files a
loader asks for and the repo has (``hf_hub_download``). When the Hub cannot be reached, offline mode is on
(``HF_HUB_OFFLINE=1``) or ``local_files_only=True``, files come from the local cache
(``try_to_load_from_cache``, no network at all), so a machine without network fails within seconds with
:func:`offline_message` instead of retrying every candidate file name. :func:`snapshot_folder` does the same for
loaders that need a whole folder (``snapshot_download``, which also gives up after one failed request).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

DEMO_NAMES = ("dualvitok-demo", "demo")
"""Names that ``DualViTok.from_pretrained`` / ``--model`` resolve to the bundled demo model."""


def offline_message(repo_id: str, what: str, reason: str, missing: list[str] | None = None) -> str:
    """The library's one message for a Hub repo that cannot be used without network."""
    files = f" ({', '.join(missing)} not in the local cache)" if missing else ""
    return (f"could not load {what} from the Hub repo {repo_id!r}: {reason}{files}. Download it once on a machine "
            f"with network, `hf download {repo_id} --local-dir DIR`, and pass DIR instead; or go online (and unset "
            "HF_HUB_OFFLINE)")


def hub_offline() -> bool:
    """Offline mode (``HF_HUB_OFFLINE``, read now and at import by ``huggingface_hub``)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return bool(constants.HF_HUB_OFFLINE) or env in ("1", "true", "yes", "on")


def check_repo_id(source: str) -> None:
    """Raise FileNotFoundError unless ``source`` can be a Hub repo id (it is not an existing path either)."""
    if os.path.exists(source) or source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source:
        raise FileNotFoundError(f"{source!r} is not a model folder (no such directory) nor a Hub repo id "
                                "(owner/name)")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError as e:
        raise FileNotFoundError(f"{source!r} is not a model folder (no such directory) nor a valid Hub repo id: "
                                f"{e}") from None


class HubFiles:
    """Files of a local folder or a Hub repo (optionally in ``subfolder``).

    Args:
        source: folder, or Hub repo id.
        revision, subfolder, cache_dir, force_download, token, local_files_only: as in ``huggingface_hub``.
    """

    def __init__(self, source: str | os.PathLike, *, revision: str | None = None, subfolder: str | None = None,
                 cache_dir: str | os.PathLike | None = None, force_download: bool = False,
                 token: str | bool | None = None, local_files_only: bool | None = None):
        self.source = os.fspath(source)
        self.subfolder = (subfolder or "").strip("/")
        self.is_local = os.path.isdir(self.source)
        if self.is_local and self.subfolder:
            if not os.path.isdir(os.path.join(self.source, self.subfolder)):
                raise FileNotFoundError(f"no subfolder {self.subfolder!r} in {self.source!r}")
        if not self.is_local:
            check_repo_id(self.source)
        self.revision, self.cache_dir, self.token = revision, cache_dir, token
        self.force_download, self.local_files_only = force_download, bool(local_files_only)
        self._files: set[str] | None = None  # the repo's file names (when the Hub answered)
        self._commit: str | None = None
        self._offline_reason: str | None = None
        self.missing: list[str] = []

    @property
    def where(self) -> str:
        kind = "folder" if self.is_local else "Hub repo"
        return f"{kind} {self.source!r}" + (f" (subfolder {self.subfolder!r})" if self.subfolder else "")

    @property
    def offline_reason(self) -> str | None:
        """Why only the local cache was used (offline mode, no connection), or None when the Hub answered."""
        return self._offline_reason

    def _repo_path(self, filename: str) -> str:
        return f"{self.subfolder}/{filename}" if self.subfolder else filename

    def _list(self) -> None:
        """Ask the Hub once for the file list; on any connection problem switch to the local cache."""
        if self._files is not None or self._offline_reason is not None:
            return
        if self.local_files_only:
            self._offline_reason = "local_files_only=True"
            return
        if hub_offline():
            self._offline_reason = "offline mode is on (HF_HUB_OFFLINE=1)"
            return
        from huggingface_hub import HfApi
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        try:
            info = HfApi(token=self.token).model_info(self.source, revision=self.revision)
        except GatedRepoError as e:
            raise PermissionError(f"Hub repo {self.source!r} is gated: accept its terms on the Hub and pass "
                                  f"token=... ({_first_line(e)})") from None
        except RepositoryNotFoundError:
            raise FileNotFoundError(f"Hub repo {self.source!r} not found (or private: pass token=...); a local "
                                    "folder of that name does not exist either") from None
        except RevisionNotFoundError:
            raise FileNotFoundError(f"revision {self.revision!r} not found in Hub repo {self.source!r}") from None
        except OfflineModeIsEnabled:
            self._offline_reason = "offline mode is on (HF_HUB_OFFLINE=1)"
            return
        except HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status == 401:
                raise PermissionError(f"Hub repo {self.source!r} needs authentication: pass token=... or log in "
                                      "with `hf auth login`") from None
            self._offline_reason = f"the Hub answered with an error ({_first_line(e)})"
            return
        except Exception as e:  # connection refused, DNS failure, timeout (httpx errors), proxy errors
            self._offline_reason = f"the Hub cannot be reached ({type(e).__name__}: {_first_line(e)})"
            return
        self._commit = info.sha
        self._files = {s.rfilename for s in (info.siblings or [])}

    def find(self, filename: str) -> str | None:
        """Local path of ``filename`` (downloaded if needed), or None if the folder / repo does not have it."""
        if self.is_local:
            path = os.path.join(self.source, self.subfolder, filename)
            return path if os.path.isfile(path) else None
        self._list()
        repo_path = self._repo_path(filename)
        if self._files is not None:
            if repo_path not in self._files:
                return None
            from huggingface_hub import hf_hub_download

            return hf_hub_download(self.source, repo_path, revision=self._commit or self.revision,
                                   cache_dir=self.cache_dir, force_download=self.force_download, token=self.token)
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(self.source, repo_path, cache_dir=self.cache_dir, revision=self.revision)
        if isinstance(path, str):
            return path
        self.missing.append(repo_path)
        return None

    def not_found(self, what: str) -> OSError:
        """The error for a needed file that :meth:`find` did not return."""
        if self._offline_reason is not None:
            return OSError(offline_message(self.source, what, self._offline_reason, self.missing))
        return FileNotFoundError(f"no {what} in {self.where}")


def snapshot_folder(source: str | os.PathLike, *, what: str = "the model", allow_patterns: list[str] | None = None,
                    revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                    force_download: bool = False, token: str | bool | None = None,
                    local_files_only: bool | None = None, subfolder: str | None = None) -> Path:
    """A local folder for ``source``: the folder itself, or a snapshot of the Hub repo (``snapshot_download``).

    Raises:
        FileNotFoundError: neither an existing folder nor a valid / existing repo.
        OSError: the repo is not in the local cache and the Hub cannot be reached (:func:`offline_message`).
    """
    text = os.fspath(source)
    if os.path.isdir(text):
        folder = Path(text)
    else:
        check_repo_id(text)
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        patterns = allow_patterns
        if subfolder and patterns is not None:
            patterns = [f"{subfolder.strip('/')}/{p}" for p in patterns]
        elif subfolder:
            patterns = [f"{subfolder.strip('/')}/*"]
        try:
            folder = Path(snapshot_download(text, revision=revision, cache_dir=cache_dir, token=token,
                                            force_download=force_download, allow_patterns=patterns,
                                            local_files_only=bool(local_files_only) or hub_offline()))
        except GatedRepoError as e:
            raise PermissionError(f"Hub repo {text!r} is gated: accept its terms on the Hub and pass token=... "
                                  f"({_first_line(e)})") from None
        except RepositoryNotFoundError:
            raise FileNotFoundError(f"Hub repo {text!r} not found (or private: pass token=...)") from None
        except RevisionNotFoundError:
            raise FileNotFoundError(f"revision {revision!r} not found in Hub repo {text!r}") from None
        except LocalEntryNotFoundError as e:
            reason = ("offline mode is on (HF_HUB_OFFLINE=1) or local_files_only=True"
                      if local_files_only or hub_offline() else "the Hub cannot be reached")
            raise OSError(offline_message(text, what, f"{reason} ({_first_line(e)})")) from None
        except Exception as e:
            if type(e).__name__ in ("IncompleteSnapshotError", "DryRunError") or isinstance(e, OSError):
                raise OSError(offline_message(text, what, f"{type(e).__name__}: {_first_line(e)}")) from None
            raise
    if subfolder:
        folder = folder / subfolder.strip("/")
        if not folder.is_dir():
            raise FileNotFoundError(f"no subfolder {subfolder!r} in {text!r}")
    return folder


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
