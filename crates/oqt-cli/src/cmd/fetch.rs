use crate::output::print_json;
use clap::Args;
use oqt_hub::{ALIASES, resolve_model};

#[derive(Args, Debug)]
pub struct FetchArgs {
    /// Model alias, hub id (org/name) or path.
    #[arg(required_unless_present = "list")]
    pub model: Option<String>,
    /// List the known aliases instead.
    #[arg(long)]
    pub list: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: FetchArgs) -> anyhow::Result<()> {
    if a.list {
        if a.json {
            let v: Vec<_> = ALIASES
                .iter()
                .map(|x| serde_json::json!({"name": x.name, "description": x.description, "source": x.source.to_string()}))
                .collect();
            return print_json(&v);
        }
        for x in ALIASES {
            println!("{:<24} {:<60} {}", x.name, x.description, x.source);
        }
        return Ok(());
    }
    let spec = a.model.expect("clap requires it");
    let pb = crate::output::spinner(&format!("fetching {spec}"));
    let r = resolve_model(&spec)?;
    pb.finish_and_clear();
    if a.json {
        print_json(&serde_json::json!({"model": spec, "path": r.path, "origin": r.origin}))
    } else {
        println!("{}", r.path.display());
        Ok(())
    }
}
