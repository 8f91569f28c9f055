"""Private plumbing shared by the whole package: one place for each job (as timm's ``_builder``/``_hub``).

* :mod:`.io` -- atomic file, JSON and image writers with clear disk-full errors, JSON-safe paths.
* :mod:`.files` -- the one image-suffix list and folder scan (skipped entries counted with a reason).
* :mod:`.deps` -- the optional-dependency guard that names the extra to install.
* :mod:`.distributed` -- joining torchrun's process group and the collective helpers built on it.
* :mod:`.decoding` -- dataclass-from-dict decoding with strict keys and typed fields.
* :mod:`.locking` -- one writer per output folder.
* :mod:`.timing` -- the interleaved best-of timing behind the fast path's one-time kernel choices.

The device policy is public and lives in :mod:`dualvitok.devices`.
"""

from .io import atomic_write, json_path, save_image, save_image_grid, to_plain, write_json

__all__ = ["atomic_write", "json_path", "save_image", "save_image_grid", "to_plain", "write_json"]
