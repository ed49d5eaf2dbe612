"""What ``GET /v1/memory`` shows each caller.

Its reservations and recent plan decisions name requests, and a request's id is the client's
own ``X-Request-Id`` when it sent one, so ids can carry names, customers or file names. With
API keys configured, a key therefore sees its own requests' entries, the server's own (a batch
in progress, a model loading) and only counts of everyone else's; an admin key
(``WHISPER_ADMIN_API_KEYS``) sees every entry. Without keys there is nobody to tell apart, and
everything is shown. The totals (reserved bytes per device, requests in flight) are the whole
server's for everyone: they are what a client needs to understand a 503.
"""

from __future__ import annotations

from typing import Any


def for_viewer(report: dict[str, Any], key_id: str | None, *, sees_all: bool) -> dict[str, Any]:
    """``report`` as the caller may see it.

    Args:
        report: :meth:`server.engine.Engine.memory_report`; its ``reservations`` and
            ``recent_decisions`` entries carry ``api_key``, the id of the key they came with
            (None: no keys, or the server's own).
        key_id: The caller's key id, or None when no keys are configured.
        sees_all: The caller holds an admin key.

    Returns:
        The report with only the caller's (and the server's own) entries, and ``hidden``:
        how many reservations (and bytes) and decisions of other keys were left out.
    """
    show_all = key_id is None or sees_all

    def shown(entry: dict[str, Any]) -> bool:
        return show_all or entry.get("api_key") in (None, key_id)

    reservations = [r for r in report["reservations"] if shown(r)]
    decisions = [d for d in report["recent_decisions"] if shown(d)]
    others = [r for r in report["reservations"] if not shown(r)]
    return {
        **report,
        "reservations": reservations,
        "recent_decisions": decisions,
        "hidden": {
            "reservations": len(others),
            "reserved_bytes": sum(r["bytes"] for r in others),
            "recent_decisions": len(report["recent_decisions"]) - len(decisions),
        },
    }


__all__ = ["for_viewer"]
