// Copyright 2026 Cloudflare, Inc.
//
// Licensed under the Apache License, Version 2.0 (the "License");
// you may not use this file except in compliance with the License.
// You may obtain a copy of the License at
//
// http://www.apache.org/licenses/LICENSE-2.0
//
// Unless required by applicable law or agreed to in writing, software
// distributed under the License is distributed on an "AS IS" BASIS,
// WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
// See the License for the specific language governing permissions and
// limitations under the License.

use crate::*;
use bytes::Bytes;
use http::header;

#[derive(Debug, Clone)]
pub struct CaseHeaderName(Bytes);

impl CaseHeaderName {
    pub fn new(name: String) -> Self {
        CaseHeaderName(name.into())
    }
}

impl CaseHeaderName {
    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }

    pub fn from_slice(buf: &[u8]) -> Self {
        CaseHeaderName(Bytes::copy_from_slice(buf))
    }
}

/// A trait that converts into case-sensitive header names.
pub trait IntoCaseHeaderName {
    fn into_case_header_name(self) -> CaseHeaderName;

    /// Aisle patch: the name as a `HeaderName`, and its case-preserving spelling only when the
    /// header keeps one (`with_case`). The default spells the name, then parses that back, as
    /// 0.9.1 did for every name; a `HeaderName` is used as it is (its titled spelling parses back
    /// to the same name), which saves a parse on every insert of a known name (issue 16).
    fn into_names(self, with_case: bool) -> Result<(HeaderName, Option<CaseHeaderName>)>
    where
        Self: Sized,
    {
        let case_header_name = self.into_case_header_name();
        let header_name: HeaderName = case_header_name
            .as_slice()
            .try_into()
            .or_err(InvalidHTTPHeader, "invalid header name")?;
        Ok((header_name, with_case.then_some(case_header_name)))
    }
}

impl IntoCaseHeaderName for CaseHeaderName {
    fn into_case_header_name(self) -> CaseHeaderName {
        self
    }
}

impl IntoCaseHeaderName for String {
    fn into_case_header_name(self) -> CaseHeaderName {
        CaseHeaderName(self.into())
    }
}

impl IntoCaseHeaderName for &'static str {
    fn into_case_header_name(self) -> CaseHeaderName {
        CaseHeaderName(self.into())
    }
}

impl IntoCaseHeaderName for HeaderName {
    fn into_case_header_name(self) -> CaseHeaderName {
        CaseHeaderName(titled_header_name(&self))
    }

    fn into_names(self, with_case: bool) -> Result<(HeaderName, Option<CaseHeaderName>)> {
        let case = with_case.then(|| CaseHeaderName(titled_header_name(&self)));
        Ok((self, case))
    }
}

impl IntoCaseHeaderName for &HeaderName {
    fn into_case_header_name(self) -> CaseHeaderName {
        CaseHeaderName(titled_header_name(self))
    }

    fn into_names(self, with_case: bool) -> Result<(HeaderName, Option<CaseHeaderName>)> {
        self.clone().into_names(with_case)
    }
}

/// Aisle patch 5: a name with the spelling to keep for it, both static (`X-Forwarded-For`): a
/// header that keeps a case map stores the spelling without copying it, where a custom
/// `HeaderName` alone was copied into a new buffer on every insert (issue 16). A spelling of
/// another length than the name's is not used: the name is spelled as a `HeaderName` is.
impl IntoCaseHeaderName for (HeaderName, &'static str) {
    fn into_case_header_name(self) -> CaseHeaderName {
        spelled(&self.0, CaseHeaderName(Bytes::from_static(self.1.as_bytes())))
    }

    fn into_names(self, with_case: bool) -> Result<(HeaderName, Option<CaseHeaderName>)> {
        let case = with_case
            .then(|| spelled(&self.0, CaseHeaderName(Bytes::from_static(self.1.as_bytes()))));
        Ok((self.0, case))
    }
}

/// Aisle patch 5, for a spelling known only at run time (an operator's `set_headers` name, as
/// written in the configuration): the spelling is a `CaseHeaderName` built once, and each insert
/// shares its bytes (a reference count) instead of copying the name. The caller makes the
/// spelling from the same text as the name; it is checked as a static one is ([`spelled`]).
impl IntoCaseHeaderName for (HeaderName, &CaseHeaderName) {
    fn into_case_header_name(self) -> CaseHeaderName {
        spelled(&self.0, self.1.clone())
    }

    fn into_names(self, with_case: bool) -> Result<(HeaderName, Option<CaseHeaderName>)> {
        let case = with_case.then(|| spelled(&self.0, self.1.clone()));
        Ok((self.0, case))
    }
}

/// `spelling` if it spells `name`, else the name spelled as a `HeaderName` is. The spelling is
/// checked by its length (a spelling of another length is surely another name); that it spells
/// the name is asserted in debug builds, where the callers' tests run: comparing it byte by byte
/// cost more than the copy it saves.
fn spelled(name: &HeaderName, spelling: CaseHeaderName) -> CaseHeaderName {
    if spelling.0.len() == name.as_str().len() {
        debug_assert!(
            spelling.0.eq_ignore_ascii_case(name.as_str().as_bytes()),
            "{spelling:?} is not {name}"
        );
        spelling
    } else {
        CaseHeaderName(titled_header_name(name))
    }
}

impl IntoCaseHeaderName for Bytes {
    fn into_case_header_name(self) -> CaseHeaderName {
        CaseHeaderName(self)
    }
}

fn titled_header_name(header_name: &HeaderName) -> Bytes {
    titled_header_name_str(header_name).map_or_else(
        || Bytes::copy_from_slice(header_name.as_str().as_bytes()),
        |s| Bytes::from_static(s.as_bytes()),
    )
}

/// The spelling HTTP/1 writes for a standard name when the header keeps no case map, if it has
/// one (Aisle patch 3: public, so a writer that serializes fields itself spells them the same).
pub fn titled_header_name_str(header_name: &HeaderName) -> Option<&'static str> {
    Some(match *header_name {
        header::ACCEPT_RANGES => "Accept-Ranges",
        header::AGE => "Age",
        header::CACHE_CONTROL => "Cache-Control",
        header::CONNECTION => "Connection",
        header::CONTENT_TYPE => "Content-Type",
        header::CONTENT_ENCODING => "Content-Encoding",
        header::CONTENT_LENGTH => "Content-Length",
        header::DATE => "Date",
        header::TRANSFER_ENCODING => "Transfer-Encoding",
        header::HOST => "Host",
        header::SERVER => "Server",
        header::SET_COOKIE => "Set-Cookie",
        // TODO: add more const header here to map to their titled case
        // TODO: automatically upper case the first letter?
        _ => {
            return None;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_case_header_name() {
        assert_eq!("FoO".into_case_header_name().as_slice(), b"FoO");
        assert_eq!("FoO".to_string().into_case_header_name().as_slice(), b"FoO");
        assert_eq!(header::SERVER.into_case_header_name().as_slice(), b"Server");
    }
}
