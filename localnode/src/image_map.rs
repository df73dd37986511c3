//! Image -> local binary map.
//!
//! One entry a line: `IMAGE_PATTERN BINARY [ENTRYPOINT]`; `#` starts a comment. A pattern matches
//! an image exactly, or as a prefix when it ends in `*`. BINARY is what runs for a container of
//! that image without `command` (the image's entrypoint). ENTRYPOINT is the path of that binary in
//! the image (e.g. `/usr/local/bin/streamops-worker`): a `command` naming it runs BINARY instead.
//! A container whose image has no entry runs its `command` as a host command (e.g. `python3`).

use std::path::{Path, PathBuf};

use anyhow::Context as _;

#[derive(Debug, Clone)]
pub struct Entry {
    pub pattern: String,
    pub binary: PathBuf,
    pub entrypoint: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct ImageMap {
    entries: Vec<Entry>,
}

impl ImageMap {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the image map {}", path.display()))?;
        Self::parse(&text, path.parent().unwrap_or(Path::new(".")))
            .with_context(|| format!("image map {}", path.display()))
    }

    /// Relative binaries are taken relative to `base`.
    pub fn parse(text: &str, base: &Path) -> anyhow::Result<Self> {
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            anyhow::ensure!(
                (2..=3).contains(&fields.len()),
                "line {}: expected `IMAGE_PATTERN BINARY [ENTRYPOINT]`, got `{line}`",
                n + 1
            );
            let binary = Path::new(fields[1]);
            entries.push(Entry {
                pattern: fields[0].to_string(),
                binary: if binary.is_absolute() {
                    binary.to_path_buf()
                } else {
                    base.join(binary)
                },
                entrypoint: fields.get(2).map(|s| s.to_string()),
            });
        }
        Ok(Self { entries })
    }

    pub fn lookup(&self, image: &str) -> Option<&Entry> {
        self.entries
            .iter()
            .find(|e| match e.pattern.strip_suffix('*') {
                Some(prefix) => image.starts_with(prefix),
                None => image == e.pattern,
            })
    }
}

/// The program and arguments of a container, Kubernetes style: `command` replaces the entrypoint,
/// `args` replaces the image's default arguments (taken as none).
pub fn program(
    map: &ImageMap,
    image: &str,
    command: &[String],
    args: &[String],
) -> Result<(PathBuf, Vec<String>), String> {
    let entry = map.lookup(image);
    match (command.split_first(), entry) {
        (Some((first, rest)), entry) => {
            let mut argv: Vec<String> = rest.to_vec();
            argv.extend(args.iter().cloned());
            let mapped = entry.filter(|e| {
                e.entrypoint.as_deref() == Some(first.as_str())
                    || e.binary.file_name().and_then(|f| f.to_str()) == Some(first.as_str())
            });
            match mapped {
                Some(e) => Ok((e.binary.clone(), argv)),
                None => Ok((PathBuf::from(first), argv)),
            }
        }
        (None, Some(e)) => Ok((e.binary.clone(), args.to_vec())),
        (None, None) => Err(format!(
            "image {image} is not in the image map and the container has no command"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> ImageMap {
        ImageMap::parse(
            "# comment\nghcr.io/streamops/streamops-worker:* target/debug/streamops-worker /usr/local/bin/streamops-worker\nexact:1 /bin/true\n",
            Path::new("/repo"),
        )
        .unwrap()
    }

    #[test]
    fn a_prefix_pattern_maps_every_tag_to_the_local_binary() {
        let (bin, argv) = program(
            &map(),
            "ghcr.io/streamops/streamops-worker:0.1.0",
            &[],
            &["run".into()],
        )
        .unwrap();
        assert_eq!(bin, PathBuf::from("/repo/target/debug/streamops-worker"));
        assert_eq!(argv, vec!["run".to_string()]);
    }

    #[test]
    fn a_command_naming_the_image_entrypoint_runs_the_local_binary() {
        let (bin, argv) = program(
            &map(),
            "ghcr.io/streamops/streamops-worker:dev",
            &["/usr/local/bin/streamops-worker".into(), "produce".into()],
            &["--count".into(), "3".into()],
        )
        .unwrap();
        assert_eq!(bin, PathBuf::from("/repo/target/debug/streamops-worker"));
        assert_eq!(argv, vec!["produce", "--count", "3"]);
    }

    #[test]
    fn an_unmapped_image_runs_its_command_on_the_host_or_is_refused_without_one() {
        let (bin, _) = program(&map(), "python:3.12", &["python3".into()], &[]).unwrap();
        assert_eq!(bin, PathBuf::from("python3"));
        assert!(program(&map(), "python:3.12", &[], &[])
            .unwrap_err()
            .contains("not in the image map"));
        assert!(map().lookup("exact:2").is_none());
        assert!(ImageMap::parse("just-one-field", Path::new("/")).is_err());
    }
}
