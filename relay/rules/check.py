"""``relay check`` for rules, catalog and skins: a list of "file:line: message" errors (empty = all good)."""

from __future__ import annotations

from pathlib import Path

from .errors import RuleError


def check(
    rules: Path | str | None = None, skins: Path | str | None = None, *, catalog: Path | str | None = None
) -> list[str]:
    """Validate the rule files (and their catalog, block and follow-up templates) and the skins; also that
    every skin a rule names exists. Never raises for bad input."""
    errors: list[str] = []
    book = None
    if rules is not None:
        from .book import RuleBook

        try:
            book = RuleBook.load(rules, catalog=catalog)
        except RuleError as e:
            errors.append(str(e))
        except Exception as e:  # noqa: BLE001 - check reports, it does not crash
            errors.append(f"{rules}:0: {type(e).__name__}: {e}")
    library = None
    if skins is not None:
        from relay.transform import SkinError, SkinLibrary

        try:
            library = SkinLibrary.load(skins)
        except SkinError as e:
            errors.append(f"{e.file}:{e.line}: {e.message}")
        except Exception as e:  # noqa: BLE001
            errors.append(f"{skins}:0: {type(e).__name__}: {e}")
    if book is not None and library is not None:
        st = book._state
        wanted = [(st.settings["default_skin"], None)] + [(r.sets.get("skin"), r) for r in st.rules]
        for name, rule in wanted:
            if name and name not in library:
                where = f"{rule.file}:{rule.line}" if rule else f"{rules}:0"
                errors.append(f"{where}: skin {name!r} not found in {skins}")
    return errors
