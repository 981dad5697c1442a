"""Client-level differential privacy: the Gaussian mechanism on every upload (an upload transform) and
the accountant that says what it guarantees (docs/privacy.md)."""

from fedtreelora.privacy.accountant import ACCOUNTANTS, epsilon, noise_multiplier_for
from fedtreelora.privacy.ledger import PrivacyLedger
from fedtreelora.privacy.mechanism import GaussianUpdate, noise_seed
from fedtreelora.privacy.settings import PrivacySettings, privacy_settings, sampling_rate

__all__ = [
    "ACCOUNTANTS",
    "GaussianUpdate",
    "PrivacyLedger",
    "PrivacySettings",
    "epsilon",
    "noise_multiplier_for",
    "noise_seed",
    "privacy_settings",
    "sampling_rate",
]
