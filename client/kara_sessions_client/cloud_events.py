"""An Event in the CloudEvents 1.0 JSON format, for consumers that speak it (and for jq)."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from kara.sessions.v1 import events_pb2 as epb

SOURCE = "/kara.sessions.v1"


def cloud_event(event: epb.Event) -> dict[str, Any]:
    kind = event.WhichOneof("data")
    data = json_format.MessageToDict(getattr(event, kind), preserving_proto_field_name=True) if kind else {}
    return {
        "specversion": "1.0",
        "id": event.event_id,
        "source": SOURCE,
        "type": event.type,
        "subject": event.subject,
        "time": event.time.ToJsonString(),
        "datacontenttype": "application/json",
        # An extension attribute: pass it to --after (or ListEvents' `after`) to resume after it.
        "karacursor": event.cursor,
        "data": data,
    }
