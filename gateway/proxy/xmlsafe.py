"""The only XML the gateway reads from clients: the first element of a SOAP Body, read safely.

When neither the path nor the SOAPAction names the service, the service is the local name of the
first element inside the SOAP Body. `BodySniffer` finds it from bytes fed as they arrive and stops
as soon as it is seen, so only a prefix of the body is ever parsed.

The parser is defusedxml's expat parser with document type declarations forbidden outright (SOAP
forbids them: SOAP 1.1 section 3, SOAP 1.2 part 1 section 5), which also rules out entity
declarations, so entity expansion (billion laughs) and external entities (XXE) are refused
before anything is expanded or fetched. Nothing builds a tree: the callbacks keep a depth counter,
so memory is bounded by what the caller feeds (see routing.SNIFF_LIMIT).

`read_operation` reads a whole small SOAP request the gateway answers itself (the status
service, proxy/status.py) with the same parser settings.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from xml.etree.ElementTree import ParseError

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import DefusedXMLParser, fromstring

SOAP11_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12_ENV = "http://www.w3.org/2003/05/soap-envelope"
_ENVELOPES = {f"{{{ns}}}Envelope": f"{{{ns}}}Body" for ns in (SOAP11_ENV, SOAP12_ENV)}
_BOUNDARY = re.compile(r'boundary\s*=\s*(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)


class UnsafeXml(Exception):
    """A DTD, an entity declaration or an external reference: refused, never expanded."""


class MalformedXml(Exception):
    """Not well-formed XML, or not a SOAP envelope."""


class _Found(Exception):
    def __init__(self, tag: str) -> None:
        super().__init__(tag)
        self.local_name = tag.rpartition("}")[2]


class _NoService(Exception):
    """The Body closed without a child element."""


class _Envelope:
    """ElementTree parser target that only counts depth and raises once it has the answer."""

    def __init__(self) -> None:
        self.depth = 0
        self.body_tag = ""
        self.in_body = False

    def start(self, tag: str, attrib: dict[str, str]) -> None:
        self.depth += 1
        if self.depth == 1:
            body = _ENVELOPES.get(tag)
            if body is None:
                raise MalformedXml(f"the document is not a SOAP envelope (root {tag!r})")
            self.body_tag = body
        elif self.depth == 2:
            self.in_body = tag == self.body_tag
        elif self.depth == 3 and self.in_body:
            raise _Found(tag)

    def end(self, tag: str) -> None:
        self.depth -= 1
        if self.depth == 1 and self.in_body:
            raise _NoService

    def data(self, data: str) -> None:
        pass

    def close(self) -> None:
        return None


class BodySniffer:
    """Feed a SOAP message (or a multipart/related package with it as the root part) in pieces.

    `feed()` returns the service name once the Body's first element has been read, else None;
    `finish()` says the message ended. Both raise UnsafeXml or MalformedXml; both return ""
    when the message has no Body child.
    """

    def __init__(self, content_type: str) -> None:
        self._parser = DefusedXMLParser(
            target=_Envelope(), forbid_dtd=True, forbid_entities=True, forbid_external=True
        )
        self._boundary: bytes | None = None
        media = content_type.partition(";")[0].strip().lower()
        if media == "multipart/related":
            match = _BOUNDARY.search(content_type)
            if match is None:
                raise MalformedXml("multipart/related without a boundary")
            self._boundary = b"--" + (match.group(1) or match.group(2)).encode("latin-1")
        # The multipart preamble and root part headers, until the XML starts (then None).
        self._pending: bytes | None = b""
        self.answer: str | None = None

    def feed(self, data: bytes) -> str | None:
        if self.answer is not None:
            return self.answer
        if self._boundary is not None:
            data = self._skip_to_root_part(data)
            if not data:
                return None
        return self._run(lambda: self._parser.feed(data))

    def finish(self) -> str:
        """The message is complete: flush the parser; "" when no service was found."""
        if self.answer is not None:
            return self.answer
        if self._boundary is not None and self._pending is not None:
            raise MalformedXml("the multipart package has no root part")
        result = self._run(self._parser.close)
        return result or ""

    def _skip_to_root_part(self, data: bytes) -> bytes:
        if self._pending is None:  # already inside the root part
            return data
        buffered = self._pending + data
        assert self._boundary is not None
        start = buffered.find(self._boundary)
        if start < 0:
            self._pending = buffered
            return b""
        end = buffered.find(b"\r\n\r\n", start)
        if end < 0:
            self._pending = buffered
            return b""
        self._pending = None
        return buffered[end + 4 :]

    def _run(self, step: Callable[[], object]) -> str | None:
        try:
            step()
        except _Found as found:
            self.answer = found.local_name
            return self.answer
        except _NoService:
            self.answer = ""
            return ""
        except DefusedXmlException as exc:
            raise UnsafeXml(type(exc).__name__) from None
        except ParseError as exc:
            raise MalformedXml(str(exc)) from None
        return None


@dataclass(frozen=True, slots=True)
class Operation:
    """A SOAP request's envelope namespace, its Body's first element and that element's simple
    children (local name -> text; the first of each name)."""

    envelope: str
    name: str
    fields: dict[str, str]


def read_operation(data: bytes) -> Operation:
    """Parse a complete, small SOAP request (the caller bounds `data`); raises UnsafeXml or
    MalformedXml. An empty Body is an operation named ""."""
    try:
        root = fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as exc:
        raise UnsafeXml(type(exc).__name__) from None
    except ParseError as exc:
        raise MalformedXml(str(exc)) from None
    body_tag = _ENVELOPES.get(root.tag)
    if body_tag is None:
        raise MalformedXml(f"the document is not a SOAP envelope (root {root.tag!r})")
    body = root.find(body_tag)
    if body is None:
        raise MalformedXml("the SOAP envelope has no Body")
    operation = next(iter(body), None)
    if operation is None:
        return Operation(root.tag[1:].partition("}")[0], "", {})
    fields: dict[str, str] = {}
    for child in operation:
        fields.setdefault(child.tag.rpartition("}")[2], (child.text or "").strip())
    return Operation(root.tag[1:].partition("}")[0], operation.tag.rpartition("}")[2], fields)
