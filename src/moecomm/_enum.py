"""The base of moecomm's string enums: an unknown value names the valid ones; a member prints its value."""

import enum


class ChoiceEnum(str, enum.Enum):
    """``str`` enum whose constructor raises ``ValueError`` listing the valid values for an unknown one.

    ``str()`` and ``format()`` (f-strings) give the value, as for the strings a user passes
    (``str(Strategy.AGRS) == "agrs"``); ``repr()`` still names the member.
    """

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def _missing_(cls, value):
        raise ValueError(f"{value!r} is not a valid {cls.__name__}; choose one of "
                         f"{', '.join(repr(m.value) for m in cls)}")
