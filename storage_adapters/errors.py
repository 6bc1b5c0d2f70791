"""Errors of the storage layer. Each names what is wrong and where, so a user can act on the message alone."""


class StoreError(Exception):
    """Base class: anything wrong with the expert store or a tier."""


class ManifestError(StoreError):
    """The manifest is missing, unreadable, or does not validate."""


class CheckpointError(StoreError):
    """The source checkpoint cannot be converted (family, missing tensors, shape or dtype mismatch)."""


class BlobNotFound(StoreError):
    """A tier does not hold the requested object."""


class TierAccessError(StoreError):
    """A tier cannot be read or written: unreadable path, missing bucket, access denied, too many failures."""


class BlobIntegrityError(StoreError):
    """Bytes read from a tier do not match the manifest. Raised only after every eligible tier was tried."""

    def __init__(self, blob: str, tier: str, expected: str, actual: str, detail: str = ""):
        self.blob, self.tier, self.expected, self.actual = blob, tier, expected, actual
        msg = f"blob {blob!r} from tier {tier!r}: checksum mismatch, expected {expected}, got {actual}"
        super().__init__(msg + (f" ({detail})" if detail else ""))
        self.detail = detail

    def __reduce__(self):  # picklable, so the error crosses Ray's process boundaries intact
        return type(self), (self.blob, self.tier, self.expected, self.actual, self.detail)
