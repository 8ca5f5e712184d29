//! The key-prefix table: which domain owns which keys under the configured `[redis] prefix`.
//!
//! Every key Aisle writes is `{prefix}<tag><rest>`, where the tag names the domain (`{` for
//! entries, `u:` for the URI index, `purge:` for the purge queue, ...). A domain claims its tag
//! once, at startup, through [`Registry::register`]; a tag equal to another domain's, or a prefix
//! of it (or the other way round), could make two domains write the same key, so it is refused
//! there, before anything touches Redis. Registering the same domain again with the same tag is
//! allowed (several instances of one domain share its keys by design).

use parking_lot::Mutex;
use std::fmt;

/// One domain's keys: `{prefix}<tag>` followed by whatever the domain appends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyspace {
    /// The configured prefix followed by the domain's tag.
    base: String,
}

impl Keyspace {
    /// The domain's own root key, `{prefix}<tag>` (for a domain that is a single key or
    /// channel, such as the epochs hash or the audit list).
    pub fn root(&self) -> &str {
        &self.base
    }

    /// `{prefix}<tag><rest>`.
    pub fn key(&self, rest: impl fmt::Display) -> String {
        format!("{}{rest}", self.base)
    }
}

/// The prefix and the tags claimed under it.
#[derive(Debug)]
pub(super) struct Registry {
    prefix: String,
    /// (domain, tag), in registration order.
    claimed: Mutex<Vec<(&'static str, &'static str)>>,
}

impl Registry {
    pub(super) fn new(prefix: String) -> Self {
        Registry {
            prefix,
            claimed: Mutex::new(Vec::new()),
        }
    }

    /// Claims `tag` for `domain`. `Err`: the tag is empty, or overlaps another domain's, or this
    /// domain already claimed a different one.
    pub(super) fn register(
        &self,
        domain: &'static str,
        tag: &'static str,
    ) -> Result<Keyspace, String> {
        if domain.is_empty() || tag.is_empty() {
            return Err(format!(
                "redis keyspace {domain:?}: a domain needs a name and a non-empty key tag, or it \
                 would own every key under the prefix"
            ));
        }
        let mut claimed = self.claimed.lock();
        for &(other, other_tag) in claimed.iter() {
            if other == domain {
                if other_tag == tag {
                    return Ok(self.keyspace(tag));
                }
                return Err(format!(
                    "redis keyspace {domain:?} is registered twice, with tags {other_tag:?} and \
                     {tag:?}; a domain has one tag: register the other keys as a domain of \
                     their own"
                ));
            }
            if other_tag.starts_with(tag) || tag.starts_with(other_tag) {
                return Err(format!(
                    "redis keyspaces {domain:?} (keys {tag:?}...) and {other:?} (keys \
                     {other_tag:?}...) overlap, so one could overwrite the other's keys; give \
                     one of them a tag that is not a prefix of the other's"
                ));
            }
        }
        claimed.push((domain, tag));
        Ok(self.keyspace(tag))
    }

    fn keyspace(&self, tag: &str) -> Keyspace {
        Keyspace {
            base: format!("{}{tag}", self.prefix),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keyspace_builds_keys_under_the_prefix_and_tag() {
        let r = Registry::new("aisle:".into());
        let audit = r.register("audit", "audit").unwrap();
        assert_eq!(audit.root(), "aisle:audit");
        assert_eq!(audit.key(":cdn:j1"), "aisle:audit:cdn:j1");
        let purge = r.register("purge queue", "purge:").unwrap();
        assert_eq!(
            purge.key(format_args!("{{{}}}:queue", "cf")),
            "aisle:purge:{cf}:queue"
        );
    }

    #[test]
    fn the_same_tag_twice_is_refused() {
        let r = Registry::new("p:".into());
        r.register("audit", "audit").unwrap();
        let e = r.register("other", "audit").unwrap_err();
        assert!(
            e.contains("\"other\"") && e.contains("\"audit\"") && e.contains("overlap"),
            "{e}"
        );
    }

    #[test]
    fn overlapping_tags_are_refused_either_way_round() {
        let r = Registry::new("p:".into());
        r.register("uri index", "u:").unwrap();
        let e = r.register("users", "u:x").unwrap_err();
        assert!(e.contains("overlap"), "{e}");
        let r = Registry::new("p:".into());
        r.register("users", "u:x").unwrap();
        assert!(r.register("uri index", "u:").is_err());
        // Sharing a first character is not an overlap.
        r.register("uploads", "up").unwrap();
    }

    #[test]
    fn a_domain_may_register_again_with_its_own_tag_only() {
        let r = Registry::new("p:".into());
        let a = r.register("webhook replays", "webhook:").unwrap();
        assert_eq!(r.register("webhook replays", "webhook:").unwrap(), a);
        let e = r.register("webhook replays", "hook:").unwrap_err();
        assert!(e.contains("registered twice"), "{e}");
    }

    #[test]
    fn an_empty_tag_is_refused() {
        let r = Registry::new("p:".into());
        assert!(r.register("everything", "").is_err());
    }

    #[test]
    fn the_domains_aisle_uses_do_not_overlap() {
        // The tags as the domains register them (storage/redis.rs, purge/queue/redis.rs,
        // invalidation/audit.rs, control.rs); server tests also build them all on one Redis.
        let r = Registry::new("aisle:".into());
        for (domain, tag) in [
            ("entries", "{"),
            ("entry uri index", "u:"),
            ("invalidation channel", "inv"),
            ("purge epochs", "epochs"),
            ("purge queue", "purge:"),
            ("audit log", "audit"),
            ("webhook replays", "webhook:"),
            ("region relay", "region:"),
        ] {
            r.register(domain, tag).unwrap();
        }
    }
}
