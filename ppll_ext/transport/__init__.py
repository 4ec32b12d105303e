"""How stages talk: the wire format and the links between neighbouring stage processes."""

from ppll_ext.transport.links import (
    LinkReceiver,
    LinkSender,
    check_count,
    check_link_settings,
    end_stream,
    link_error,
    open_links,
)
from ppll_ext.transport.wire import DATA, HEADER_LEN, Kind, Msg, decode_header, encode_header, payload_shape

__all__ = ["DATA", "HEADER_LEN", "Kind", "LinkReceiver", "LinkSender", "Msg", "check_count", "check_link_settings",
           "decode_header", "encode_header", "end_stream", "link_error", "open_links", "payload_shape"]
