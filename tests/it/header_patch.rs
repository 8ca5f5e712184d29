//! The vendored pingora-http's patches (`vendor/pingora-http/PATCHES.md`): a header inserted by
//! `HeaderName` is the header the old spell-and-parse made, and a header built for a parsed
//! message takes the fields a gateway adds without its maps growing (issue 16: both were a
//! share of every request's instructions), a cloned request (patch 4: rebuilt with that room)
//! is sent exactly as the original, and a name inserted with a static spelling (patch 5) is
//! sent in it.

use http::header::{self, HeaderName, HeaderValue};
use pingora::http::{
    CaseHeaderName, IntoCaseHeaderName, RequestHeader, ResponseHeader, PROXY_HEADROOM,
};

/// Names of every kind: standard ones pingora spells in title case, standard ones it does not,
/// and custom ones.
fn names() -> Vec<HeaderName> {
    vec![
        header::HOST,
        header::AGE,
        header::ACCEPT_RANGES,
        header::CONTENT_LENGTH,
        header::SET_COOKIE,
        header::VARY,
        header::ETAG,
        header::FORWARDED,
        HeaderName::from_static("cache-status"),
        HeaderName::from_static("x-forwarded-for"),
    ]
}

#[test]
fn a_header_name_becomes_what_its_spelling_parses_to() {
    for name in names() {
        let spelled = name.clone().into_case_header_name();
        let parsed = HeaderName::from_bytes(spelled.as_slice()).unwrap();
        for with_case in [true, false] {
            let (fast, case) = name.clone().into_names(with_case).unwrap();
            assert_eq!(fast, parsed, "{name}");
            assert_eq!(
                case.map(|c| c.as_slice().to_vec()),
                with_case.then(|| spelled.as_slice().to_vec()),
                "{name}"
            );
            let (by_ref, _) = (&name).into_names(with_case).unwrap();
            assert_eq!(by_ref, parsed, "{name}");
        }
    }
    assert!("bad name".into_names(true).is_err());
    assert!("bad name".into_names(false).is_err());
}

/// What a client sees is unchanged: the case a request's fields were received in is what goes
/// upstream, and an inserted `HeaderName` is sent in pingora's spelling.
#[test]
fn inserted_names_are_sent_as_before() {
    let mut req = RequestHeader::build("GET", b"/x", Some(2)).unwrap();
    req.append_header("hOsT", "a.example").unwrap();
    req.append_header("X-Custom", "1").unwrap();
    req.insert_header(header::HOST, "b.example").unwrap();
    let xff = HeaderName::from_static("x-forwarded-for");
    req.insert_header(&xff, "10.0.0.1").unwrap();
    assert!(req.headers.contains_key(&xff));
    req.append_header(header::AGE, "5").unwrap();
    let mut wire = Vec::new();
    req.header_to_h1_wire(&mut wire);
    assert_eq!(
        String::from_utf8(wire).unwrap(),
        "Host: b.example\r\nX-Custom: 1\r\nx-forwarded-for: 10.0.0.1\r\nAge: 5\r\n"
    );
}

/// Patch 5: a name given with a static spelling is stored as the name and sent in that
/// spelling; a spelling of another length is not used (the name is spelled as pingora spells a
/// `HeaderName`); a header without a case map is sent as it always was.
#[test]
fn a_name_with_its_spelling_is_sent_so() {
    let xff = HeaderName::from_static("x-forwarded-for");
    let mut req = RequestHeader::build("GET", b"/x", Some(2)).unwrap();
    req.insert_header((xff.clone(), "X-Forwarded-For"), "10.0.0.1")
        .unwrap();
    req.insert_header((header::FORWARDED, "Forwarded"), "for=10.0.0.1")
        .unwrap();
    req.insert_header((HeaderName::from_static("x-custom"), "X-Longer-Name"), "1")
        .unwrap();
    assert!(req.headers.contains_key(&xff));
    assert!(req.headers.contains_key(header::FORWARDED));
    let mut wire = Vec::new();
    req.header_to_h1_wire(&mut wire);
    assert_eq!(
        String::from_utf8(wire).unwrap(),
        "X-Forwarded-For: 10.0.0.1\r\nForwarded: for=10.0.0.1\r\nx-custom: 1\r\n"
    );
    for with_case in [true, false] {
        let (name, case) = (xff.clone(), "X-Forwarded-For")
            .into_names(with_case)
            .unwrap();
        assert_eq!(name, xff);
        assert_eq!(
            case.map(|c| c.as_slice().to_vec()),
            with_case.then(|| b"X-Forwarded-For".to_vec())
        );
    }
    let mut plain = RequestHeader::build_no_case("GET", b"/x", None).unwrap();
    plain
        .insert_header((xff, "X-Forwarded-For"), "10.0.0.1")
        .unwrap();
    let mut wire = Vec::new();
    plain.header_to_h1_wire(&mut wire);
    assert_eq!(
        String::from_utf8(wire).unwrap(),
        "x-forwarded-for: 10.0.0.1\r\n"
    );
}

/// Patch 5 for a spelling made at run time (an upstream's `set_headers` name as configured):
/// the case map shares the one spelling's bytes, the wire carries it, and a spelling of another
/// length is not used.
#[test]
fn a_name_with_a_spelling_built_at_load_is_sent_so() {
    let key = HeaderName::from_static("x-api-key");
    let spelling = CaseHeaderName::new("X-API-Key".to_string());
    let wrong = CaseHeaderName::new("X-Key".to_string());
    let mut req = RequestHeader::build("GET", b"/x", Some(2)).unwrap();
    req.insert_header((key.clone(), &spelling), "k1").unwrap();
    req.insert_header((HeaderName::from_static("x-other"), &wrong), "2")
        .unwrap();
    assert_eq!(req.headers.get(&key).unwrap(), "k1");
    let mut wire = Vec::new();
    req.header_to_h1_wire(&mut wire);
    assert_eq!(
        String::from_utf8(wire).unwrap(),
        "X-API-Key: k1\r\nx-other: 2\r\n"
    );
    let (name, case) = (key.clone(), &spelling).into_names(true).unwrap();
    assert_eq!(name, key);
    let case = case.unwrap();
    assert_eq!(case.as_slice(), b"X-API-Key");
    assert_eq!(
        case.as_slice().as_ptr(),
        spelling.as_slice().as_ptr(),
        "the spelling's bytes are shared, not copied"
    );
    assert!((key, &spelling).into_names(false).unwrap().1.is_none());
}

#[test]
fn a_parsed_request_takes_the_forwarding_fields_without_growing() {
    // As pingora's HTTP/1 reader builds it: a hint of the fields it parsed.
    for parsed in [0, 1, 3, 7, 20] {
        let mut req = RequestHeader::build("GET", b"/x", Some(parsed)).unwrap();
        for i in 0..parsed {
            req.append_header(format!("x-field-{i}"), "v").unwrap();
        }
        let room = req.headers.capacity();
        assert!(room >= parsed + PROXY_HEADROOM, "{parsed}: {room}");
        for name in [
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "forwarded",
        ] {
            req.insert_header(HeaderName::from_static(name), HeaderValue::from_static("v"))
                .unwrap();
        }
        assert_eq!(req.headers.capacity(), room, "{parsed} fields grew");
    }
}

#[test]
fn an_upstream_answer_takes_the_gateway_fields_without_growing() {
    let mut resp = ResponseHeader::build(200, Some(5)).unwrap();
    for i in 0..5 {
        resp.append_header(format!("x-field-{i}"), "v").unwrap();
    }
    let room = resp.headers.capacity();
    resp.insert_header(
        HeaderName::from_static("cache-status"),
        "aisle; fwd=uri-miss",
    )
    .unwrap();
    resp.insert_header(header::AGE, 0).unwrap();
    resp.insert_header(header::ACCEPT_RANGES, "bytes").unwrap();
    assert_eq!(resp.headers.capacity(), room);
}

/// Patch 4: pingora's copy of a request for the upstream is rebuilt with room to spare; it must
/// be the same request: names, case, values, repeated fields and order, after removals too.
#[test]
fn a_cloned_request_is_sent_as_the_original() {
    let mut req = RequestHeader::build("GET", b"/x?y=1", Some(7)).unwrap();
    for (name, value) in [
        ("hOsT", "a.example"),
        ("X-Custom", "1"),
        ("accept", "a"),
        ("X-Custom", "2"),
        ("cookie", "c=1"),
        ("Accept", "b"),
        ("x-gone", "z"),
    ] {
        req.append_header(name, value).unwrap();
    }
    req.remove_header("x-gone");
    req.remove_header("hOsT");
    req.append_header("Host", "b.example").unwrap();
    let wire = |r: &RequestHeader| {
        let mut out = Vec::new();
        r.header_to_h1_wire(&mut out);
        String::from_utf8(out).unwrap()
    };
    let copy = req.clone();
    assert_eq!(wire(&copy), wire(&req));
    assert_eq!(copy.uri, req.uri);
    assert_eq!(copy.method, req.method);
    assert_eq!(copy.raw_path(), req.raw_path());
    // Without a case map too (a request built by the app).
    let mut plain = RequestHeader::build_no_case("GET", b"/x", None).unwrap();
    plain.append_header("x-a", "1").unwrap();
    plain.append_header("x-a", "2").unwrap();
    assert_eq!(wire(&plain.clone()), wire(&plain));
}
