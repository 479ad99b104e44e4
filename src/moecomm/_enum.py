"""The base of moecomm's string enums: an unknown value names the valid ones."""

import enum


class ChoiceEnum(str, enum.Enum):
    """``str`` enum whose constructor raises ``ValueError`` listing the valid values for an unknown one."""

    @classmethod
    def _missing_(cls, value):
        raise ValueError(f"{value!r} is not a valid {cls.__name__}; choose one of "
                         f"{', '.join(repr(m.value) for m in cls)}")
