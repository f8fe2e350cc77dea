"""RECAST's ``PeftType`` member (``peft_recast.register`` then registers the config and tuner with PEFT).

PEFT 0.21 only registers names that are members of its ``PeftType`` enum, and has no plug-in discovery, so the
member is added at import time. A real member (not a plain string) keeps ``peft_type.value`` working in
transformers' adapter integration and in PEFT's error messages.
"""

from __future__ import annotations

from peft.utils import PeftType

NAME = "RECAST"


def _add_peft_type_member(name: str) -> PeftType:
    """Return ``PeftType[name]``, adding it as a genuine member of the ``str`` enum first if needed."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member._sort_order_ = len(PeftType._member_names_)
    member.__objclass__ = PeftType
    PeftType._member_names_.append(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ refuses to rebind members
    return member


RECAST: PeftType = _add_peft_type_member(NAME)
