"""Math rewards: final-answer extraction and time-bounded math-verify equivalence."""

from jaxtrace.rewards.extract import (
    extract_answer,
    extract_boxed,
    gsm8k_gold,
    parse_plain_number,
)
from jaxtrace.rewards.verifier import STAT_KEYS, MathVerifier

__all__ = [
    "STAT_KEYS",
    "MathVerifier",
    "extract_answer",
    "extract_boxed",
    "gsm8k_gold",
    "parse_plain_number",
]
