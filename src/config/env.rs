//! `${VAR}` expansion: secrets and addresses come from the environment, never from the
//! repository. A leaf (no crate imports), so every part of the config can use it.
//!
//! `${VAR:-default}` is the shell's (and docker compose's) form for an optional variable: the
//! default when `VAR` is unset or empty (`${AISLE_ADMIN_TOKEN:-}` in the shipped config: no
//! token, the admin API disabled). A plain `${VAR}` that is unset is an error naming it.

/// Replaces `${VAR}` (and `${VAR:-default}`) with the environment variable's value.
pub(crate) fn expand_env(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err(format!("{s:?} has a \"${{\" without a closing '}}'"));
        };
        let (name, default) = match after[..end].split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (&after[..end], None),
        };
        match (std::env::var(name), default) {
            (Ok(v), Some(d)) if v.is_empty() => out.push_str(d),
            (Ok(v), _) => out.push_str(&v),
            (Err(_), Some(d)) => out.push_str(d),
            (Err(_), None) => {
                return Err(format!(
                    "environment variable {name} is not set (referenced as ${{{name}}}); export it before starting aisle"
                ))
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_expansion() {
        std::env::set_var("AISLE_TEST_HOST", "10.1.2.3");
        assert_eq!(
            expand_env("http://${AISLE_TEST_HOST}:80").unwrap(),
            "http://10.1.2.3:80"
        );
        assert!(expand_env("${AISLE_SURELY_UNSET_VAR}")
            .unwrap_err()
            .contains("not set"));
        assert!(expand_env("${OPEN").is_err());
        assert_eq!(expand_env("a${AISLE_SURELY_UNSET_VAR:-}b").unwrap(), "ab");
        assert_eq!(
            expand_env("${AISLE_SURELY_UNSET_VAR:-dflt}").unwrap(),
            "dflt"
        );
        assert_eq!(expand_env("${AISLE_TEST_HOST:-dflt}").unwrap(), "10.1.2.3");
    }
}
