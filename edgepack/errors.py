"""The one error hierarchy of edgepack.

Every failure a user can meet is an :class:`EdgepackError` subclass whose message says what was wrong
and, where there is one, what to do about it. Callers catch the narrowest class they can act on; the CLI
catches :class:`EdgepackError` and prints its message with a non-zero exit code.

    EdgepackError
    ├── ConfigError                 bad configuration or command-line value
    ├── KeyFileError                a key file that cannot be read or has the wrong kind of key
    │   └── KeyPassphraseError      an encrypted key and no (or a wrong) passphrase
    ├── TrustStoreError             a trust directory that is missing or malformed
    │   └── TrustUpdateError        a new trust root refused (signatures, version, revocations, expiry)
    ├── BundleError                 anything wrong with a bundle
    │   ├── BundleFormatError       not a well-formed bundle (bad archive, bad manifest)
    │   │   ├── UnsafeArchiveError  hostile archive: traversal, links, duplicates, caps exceeded
    │   │   └── TruncatedBundleError
    │   ├── PayloadError            the payload does not match what the manifest pins
    │   │   ├── PayloadHashMismatchError
    │   │   ├── MissingPayloadError
    │   │   └── UnexpectedPayloadError
    │   └── VerificationError       the bundle is well formed but is not to be trusted or run here
    │       ├── SignatureInvalidError
    │       ├── UnknownKeyError
    │       ├── RevokedKeyError
    │       ├── ThresholdNotMetError
    │       ├── ExpiredBundleError
    │       ├── RollbackRefusedError
    │       ├── TargetMismatchError
    │       └── ExpiredTrustError   the device's trust root expired: nothing new is accepted
    ├── RuntimeBackendError         a runtime that cannot load or run a model
    │   └── RuntimeNotInstalledError
    ├── InferenceInputError         inputs that do not fit a model's signature
    ├── CompileError                the compiler could not produce a bundle
    │   ├── ModelLoadError          not a model, or an invalid graph
    │   ├── UnsupportedModelError   an op/shape the target cannot run
    │   ├── DataError               calibration/validation data that does not fit the model
    │   └── AccuracyError           the result lost more accuracy than allowed
    ├── InstallError                the agent could not install a bundle
    │   └── SelfTestError           the bundle's self-test failed on this device
    ├── StoreLockedError            another process holds the device's state directory
    ├── ControlSocketError          the device daemon's control socket broke off or refused a request
    ├── ProtocolError               a malformed or unexpected MQTT message
    └── ApiError                    a request the local inference API cannot serve (4xx)
        ├── ModelNotFoundError, ModelNotReadyError
        └── BadRequestError, RequestTooLargeError, UnauthorizedError
"""

from __future__ import annotations


class EdgepackError(Exception):
    """Base of every error edgepack raises on purpose."""


class ConfigError(EdgepackError):
    """A configuration file or command-line value is wrong."""


class KeyFileError(EdgepackError):
    """A key file is missing, unreadable or holds the wrong kind of key."""


class KeyPassphraseError(KeyFileError):
    """A private key is encrypted and no (or a wrong) passphrase was given."""


class TrustStoreError(EdgepackError):
    """A trust store directory is missing or malformed."""


class TrustUpdateError(TrustStoreError):
    """A new version of the trust root was refused (signatures, version order, expiry, revocations)."""

    code = "trust_update"


# --- bundles -------------------------------------------------------------------------------------


class BundleError(EdgepackError):
    """Something is wrong with a bundle."""


class BundleFormatError(BundleError):
    """The file is not a well-formed edgepack bundle."""


class UnsafeArchiveError(BundleFormatError):
    """The archive holds something a bundle may never hold (traversal, links, duplicates, too much)."""


class TruncatedBundleError(BundleFormatError):
    """The archive ends before its declared content does."""


class PayloadError(BundleError):
    """The payload files do not match what the signed manifest pins."""


class PayloadHashMismatchError(PayloadError):
    """A payload file's size or sha256 differs from the manifest's."""


class MissingPayloadError(PayloadError):
    """A file the manifest lists is not in the bundle."""


class UnexpectedPayloadError(PayloadError):
    """The bundle holds a file the manifest does not list."""


class VerificationError(BundleError):
    """The bundle is well formed but is not to be trusted or run here."""


class SignatureInvalidError(VerificationError):
    """A signature does not match the manifest."""


class UnknownKeyError(VerificationError):
    """The bundle is signed by a key the trust store does not know."""


class RevokedKeyError(VerificationError):
    """The bundle is signed by a key the trust store has revoked."""


class ThresholdNotMetError(VerificationError):
    """Fewer valid signatures than the trust store's threshold."""


class ExpiredBundleError(VerificationError):
    """The bundle's expiry time has passed."""


class RollbackRefusedError(VerificationError):
    """The bundle's version is lower than one already seen for the same model."""


class TargetMismatchError(VerificationError):
    """The bundle was built for another target than this device."""


class ExpiredTrustError(VerificationError):
    """The device's trust root has expired: it serves what is installed but accepts nothing new."""

    code = "trust_expired"


# --- runtimes ------------------------------------------------------------------------------------


class RuntimeBackendError(EdgepackError):
    """A runtime backend cannot load or run a model."""


class RuntimeNotInstalledError(RuntimeBackendError):
    """The runtime a bundle needs is not installed; the message names the extra to install."""


class InferenceInputError(EdgepackError):
    """Inputs do not fit the model's signature (name, dtype or shape)."""


# --- compiler ------------------------------------------------------------------------------------


class CompileError(EdgepackError):
    """The compiler could not produce a bundle."""


class ModelLoadError(CompileError):
    """The input is not a model, or its graph is invalid."""


class UnsupportedModelError(CompileError):
    """The model uses an op or a shape the target cannot run."""


class ModelRunError(UnsupportedModelError):
    """The target's runtime failed to run a compiled candidate on this host (a kernel refused it).

    Like :class:`QuantizerError`, under ``--precision auto`` an int8 or fp16 candidate that cannot run
    is recorded and the compile goes on to the next precision."""


class QuantizerError(UnsupportedModelError):
    """The int8 quantizer itself (onnxruntime's tooling, NNCF, ai-edge-quantizer) failed on this model.

    Under ``--precision auto`` the compiler records it and falls back to the target's float precisions;
    asked for int8 explicitly, it is the compile's error."""


class DataError(CompileError):
    """Calibration or validation data does not fit the model."""


class AccuracyError(CompileError):
    """The compiled model lost more accuracy than the bar allows."""


# --- agent ---------------------------------------------------------------------------------------


class InstallError(EdgepackError):
    """The agent could not install a bundle."""


class SelfTestError(InstallError):
    """A bundle's self-test vectors did not reproduce on this device."""


class StoreLockedError(EdgepackError):
    """Another process holds the device's state directory (agent/store_lock.py); the message names it.

    ``holder`` is the lock note (:class:`edgepack.agent.store_lock.LockHolder`) when one was readable."""

    def __init__(self, message: str, *, holder: object = None) -> None:
        super().__init__(message)
        self.holder = holder


class ControlSocketError(EdgepackError):
    """The device daemon's control socket (agent/control.py) broke off or refused a request."""


class ProtocolError(EdgepackError):
    """An MQTT message is malformed, of an unknown kind or not meant for us."""


# --- local inference API -------------------------------------------------------------------------
# ApiError and its subclasses are what the agent's local API (edgepack.agent.api) answers with a 4xx.
# The repository raises ModelNotFoundError / ModelNotReadyError; the API's codecs raise the others.
#
#   ApiError                        a request the local inference API cannot serve
#   ├── ModelNotFoundError          no model of that name, or not in that version
#   ├── ModelNotReadyError          the model exists but cannot serve now (loading, swapping out)
#   ├── BadRequestError             malformed request: not JSON, bad fields, truncated binary data
#   ├── RequestTooLargeError        the body is larger than the configured cap
#   ├── UnauthorizedError           missing or wrong bearer token
#   └── ServerOverloadedError       the bound on requests in flight or their queued bytes is reached


class ApiError(EdgepackError):
    """A request the local inference API cannot serve."""


class ModelNotFoundError(ApiError):
    """No model of that name is installed, or not in the requested version."""


class ModelNotReadyError(ApiError):
    """The model is known but cannot serve now (still loading, or being swapped out)."""


class BadRequestError(ApiError):
    """The request is malformed: not JSON, missing or wrong fields, truncated binary tensor data."""


class RequestTooLargeError(ApiError):
    """The request body is larger than the API's configured cap."""


class UnauthorizedError(ApiError):
    """The API requires a bearer token and the request carries none or a wrong one."""


class ServerOverloadedError(ApiError):
    """The API's bound on requests in flight or on their queued bytes is reached: 503 with Retry-After."""


# --- MQTT delivery -------------------------------------------------------------------------------
# Subclasses of ProtocolError raised by edgepack.protocol, edgepack.mqtt and the agent's link. Each
# carries a short machine-readable ``code`` that the device puts into the "rejected"/"result" event it
# publishes, next to the human-readable message (docs/protocol.md lists the codes).
#
#   ProtocolError
#   ├── MalformedMessageError       not JSON, not the schema, or another protocol version
#   ├── UnknownCommandError         a command action this agent does not know
#   ├── WrongRecipientError         a message for another device or a group this device is not in
#   ├── ReplayedCommandError        a command id this device has already accepted
#   ├── StaleCommandError           a command older than one already accepted, or past its expiry
#   │   └── CommandExpiredError     an accepted command reached its expiry before it could finish
#   ├── TransferError               a bundle transfer that cannot go on
#   │   ├── ChunkMismatchError      a chunk whose bytes do not match its hash or size
#   │   ├── IndexMismatchError      a chunk index that contradicts itself or the signed command
#   │   ├── QuotaExceededError      the bundle would not fit in the device's disk quota
#   │   ├── TransferStalledError    what the transfer misses never arrives (gone from the broker)
#   │   └── JobDeadlineError        a link job ran past its deadline
#   └── BrokerConnectionError       the broker cannot be reached or refuses the connection


class MalformedMessageError(ProtocolError):
    """A message that is not JSON, does not match its schema, or speaks another protocol version."""

    code = "malformed"


class UnknownCommandError(ProtocolError):
    """A command whose action this agent does not know."""

    code = "unknown_command"


class WrongRecipientError(ProtocolError):
    """A command addressed to another device, or to a group this device is not in."""

    code = "wrong_recipient"


class ReplayedCommandError(ProtocolError):
    """A command whose id this device has already accepted."""

    code = "replayed"


class StaleCommandError(ProtocolError):
    """A command older (by sequence) than one already accepted for the same model, or past its expiry."""

    code = "stale"


class TransferError(ProtocolError):
    """A bundle transfer that cannot go on."""

    code = "transfer"


class ChunkMismatchError(TransferError):
    """A chunk whose bytes do not match the hash it was published under, or the size its index gives."""

    code = "chunk_mismatch"


class IndexMismatchError(TransferError):
    """A chunk index that contradicts itself or the signed command that pins it."""

    code = "index_invalid"


class QuotaExceededError(TransferError):
    """The bundle would not fit in the device's disk quota or free space."""

    code = "quota"


class TransferStalledError(TransferError):
    """A transfer that cannot progress: what it is missing never arrived, however often the device asked."""

    code = "stalled"


class JobDeadlineError(TransferError):
    """A link job (fetch and install) ran past its deadline (``[link] deadline_min_s``/``deadline_rate``)."""

    code = "deadline"


class CommandExpiredError(StaleCommandError):
    """An accepted command reached its ``expires_at`` before it could finish (while queued, running or pending)."""

    code = "expired"


class BrokerConnectionError(ProtocolError):
    """The MQTT broker cannot be reached or refuses the connection."""

    code = "broker"


# --- converter toolchains and conversion ---------------------------------------------------------
# Raised by edgepack.compiler.toolchain (managed converter environments, e.g. onnx2tf for TFLite) and
# the converters that run in them.
#
#   EdgepackError
#   └── ToolchainError              a managed converter toolchain that cannot be installed or run
#   CompileError
#   └── ConversionError             a converter failed on a model (not an unsupported op: that is
#                                   UnsupportedModelError, naming node and op)


class ToolchainError(EdgepackError):
    """A managed converter toolchain cannot be installed, found or run; the message says how to fix it."""


class ConversionError(CompileError):
    """A converter (e.g. onnx2tf) failed on the model; the message names the step and points to its log."""


# --- fleet rollouts ------------------------------------------------------------------------------
# Raised by edgepack.fleet (the rollout engine, its journal and the device registry).
#
#   EdgepackError
#   └── FleetError                  a rollout or registry operation that cannot go ahead
#       └── JournalLockedError      another operator process is running rollouts on this journal
#       └── FleetIdentityError      the fleet CA, a device/operator certificate or the broker config (fleet/ca.py)


class FleetError(EdgepackError):
    """A rollout, its journal or the device registry cannot do what was asked; the message says why."""


class JournalLockedError(FleetError):
    """Another operator process holds the rollout journal; the message names it."""


class FleetIdentityError(FleetError):
    """The fleet CA, a certificate it issues or the broker configuration made from it cannot be used as asked."""
