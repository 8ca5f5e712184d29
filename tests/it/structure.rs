//! The code's structure, checked: dependencies point one way through the layers below, and
//! DEVELOPERS.md's module map names every source file (and only files that exist).
//!
//! A module may use modules of its own layer or of layers below it, never above: leaves know
//! nothing of config, storage knows nothing of invalidation, and so on up to the tools. The
//! check reads `crate::<module>` paths in code (comments and doc links are not dependencies).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Top-level modules by layer, lowest first.
const LAYERS: &[&[&str]] = &[
    &[
        "alloc",
        "diag",
        "units",
        "clock",
        "metrics",
        "usage",
        "statedir",
        "api_error",
    ],
    &["rules"],
    &["config", "trust"],
    &["key", "policy", "admission"],
    &["redis"],
    &["storage", "purge"],
    &["invalidation"],
    &["proxy", "admin", "control", "reload", "warm"],
    &["server"],
    &["tools"],
    &["fuzz"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn source_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            source_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file under `src/` belongs to (`None` for lib.rs and main.rs).
fn module_of(relative: &Path) -> Option<String> {
    let first = relative.components().next()?.as_os_str().to_string_lossy();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_string();
    (name != "lib" && name != "main").then_some(name)
}

/// The `crate::<module>` references in the code of one file (comments skipped).
fn uses(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
            rest = after;
        }
    }
    found
}

/// Every upward import: `(file, its module, the module it uses)`.
fn violations(root: &Path) -> Vec<(String, String, String)> {
    let src = root.join("src");
    let mut files = Vec::new();
    source_files(&src, &mut files);
    let mut bad = Vec::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap();
        let Some(module) = module_of(relative) else {
            continue;
        };
        let own = layer_of(&module).unwrap_or_else(|| {
            panic!(
                "src/{}: module {module:?} has no layer in LAYERS",
                relative.display()
            )
        });
        for used in uses(&std::fs::read_to_string(&file).unwrap()) {
            let Some(theirs) = layer_of(&used) else {
                continue; // not a top-level module (e.g. a macro)
            };
            if theirs > own {
                bad.push((format!("src/{}", relative.display()), module.clone(), used));
            }
        }
    }
    bad
}

#[test]
fn dependencies_point_one_way() {
    let bad = violations(Path::new(env!("CARGO_MANIFEST_DIR")));
    let lines: Vec<String> = bad
        .iter()
        .map(|(file, m, used)| {
            format!(
                "{file}: `{m}` (layer {}) uses `crate::{used}` (layer {}), a layer above it",
                layer_of(m).unwrap(),
                layer_of(used).unwrap()
            )
        })
        .collect();
    assert!(
        lines.is_empty(),
        "upward dependencies; move the shared piece down or the caller up:\n{}",
        lines.join("\n")
    );
}

#[test]
fn the_checker_sees_upward_and_ignores_comments() {
    let text = "use crate::config::Config;\n// crate::server is only mentioned\n/// [`crate::tools`] too\nlet x = crate::proxy::thing();";
    let found = uses(text);
    assert!(found.contains("config") && found.contains("proxy"));
    assert!(!found.contains("server") && !found.contains("tools"));
    assert_eq!(
        module_of(Path::new("storage/memory/mod.rs")).as_deref(),
        Some("storage")
    );
    assert_eq!(module_of(Path::new("key.rs")).as_deref(), Some("key"));
    assert_eq!(module_of(Path::new("lib.rs")), None);
}

/// The modules `src/lib.rs` declares: `pub mod x;`, and `mod x;` right under `#[cfg(test)]`
/// (test-only modules such as `fuzz`).
fn declared_modules(lib: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut test_only = false;
    for line in lib.lines().map(str::trim) {
        let name = line
            .strip_prefix("pub mod ")
            .or_else(|| test_only.then(|| line.strip_prefix("mod ")).flatten());
        if let Some(m) = name {
            found.insert(m.trim_end_matches(';').to_string());
        }
        test_only = line == "#[cfg(test)]";
    }
    found
}

#[test]
fn test_only_modules_count_as_declared() {
    let lib = "pub mod a;\n#[cfg(test)]\nmod fuzz;\nmod private;\n";
    let found = declared_modules(lib);
    assert!(found.contains("a") && found.contains("fuzz"));
    assert!(
        !found.contains("private"),
        "a plain `mod` is not a layer of its own"
    );
}

#[test]
fn every_top_level_module_has_a_layer_and_lib_rs_names_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = std::fs::read_to_string(root.join("src/lib.rs")).unwrap();
    let declared = declared_modules(&lib);
    let layered: BTreeSet<String> = LAYERS
        .iter()
        .flat_map(|l| l.iter())
        .map(|m| m.to_string())
        .collect();
    assert_eq!(declared, layered, "src/lib.rs modules vs LAYERS");
}

#[test]
fn developers_md_maps_every_source_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("DEVELOPERS.md")).unwrap();
    let mut files = Vec::new();
    source_files(&root.join("src"), &mut files);
    let mut missing = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(root).unwrap().display().to_string();
        if !doc.contains(&format!("`{rel}`")) {
            missing.push(rel);
        }
    }
    assert!(
        missing.is_empty(),
        "DEVELOPERS.md's module map lacks: {missing:?}"
    );
    // And every `src/...rs` it names exists.
    let named: Vec<&str> = doc
        .split('`')
        .filter(|s| s.starts_with("src/") && s.ends_with(".rs"))
        .collect();
    let gone: Vec<&&str> = named.iter().filter(|p| !root.join(p).exists()).collect();
    assert!(
        gone.is_empty(),
        "DEVELOPERS.md names files that do not exist: {gone:?}"
    );
}
