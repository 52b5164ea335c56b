//! The config file's parsing and validation: what is accepted, and what each refusal says.

use super::*;

fn parse(text: &str) -> Result<SiteConfig, ConfigError> {
    SiteConfig::parse(text, Path::new("site.toml"), Path::new("/etc/geomirror"))
}

const GOOD: &str = r#"
    [site]
    name = "dc1"
    [[volume]]
    name = "vol0"
    media = "vol0.img"
    size = "1G"
"#;

#[test]
fn defaults_and_relative_paths() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.nbd.listen, "127.0.0.1:10809".parse().unwrap());
    assert_eq!(c.nbd.handshake_timeout, Duration::from_secs(10));
    assert_eq!(c.nbd.max_inflight_bytes, 256 << 20);
    assert_eq!(c.volumes[0].media, PathBuf::from("/etc/geomirror/vol0.img"));
    assert_eq!(c.volumes[0].geometry.extent_bytes(), 1 << 20);
    assert_eq!(c.volumes[0].core.mode, Mode::Standalone);
}

#[test]
fn bad_values_name_their_field() {
    let err = |text: &str| parse(text).unwrap_err().to_string();
    assert!(err(&GOOD.replace("1G", "1000")).contains("volume[0].size"));
    assert!(err(&GOOD.replace("\"1G\"", "\"1G\"\nextent_size = \"3M\"")).contains("not a power of two"));
    assert!(err(&GOOD.replace("\"vol0\"", "\"a/b\"")).contains("volume[0].name"));
    assert!(err(&GOOD.replace("[site]", "[nbd]\nlisten = \"nowhere\"\n[site]")).contains("nbd.listen"));
    assert!(err(&GOOD.replace("[site]", "[nbd]\nmax_inflight_bytes_per_connection = \"1M\"\n[site]")).contains("32M"));
    let site_budget = err(&GOOD.replace("[site]", "[nbd]\nmax_connections = 150\n[site]"));
    assert!(site_budget.contains("nbd.max_inflight_bytes") && site_budget.contains("between 332M"), "{site_budget}");
    assert!(err("[site]\nname = \"x\"").contains("no [[volume]]"));
    assert!(err(&format!("{GOOD}\n[[volume]]\nname = \"vol0\"\nmedia = \"b\"\nsize = 4096")).contains("used by two volumes"));
}

#[test]
fn sizes_and_names_say_which_field_and_what_is_expected() {
    let err = |text: &str| parse(text).unwrap_err().to_string();
    let e = err(&GOOD.replace("\"1G\"", "-16777216"));
    assert_eq!(
        e,
        "config file site.toml: volume[0].size: -16777216 is negative; a size is a whole number of bytes or a string with a binary unit, like 4096 or \"8G\" (line 7)"
    );
    let e = err(&GOOD.replace("\"1G\"", "\"1G\"\nextent_size = \"3M\""));
    assert!(e.contains("volume[0].extent_size: extent size 3145728 bytes is not a power of two"), "{e}");
    let e = err(&GOOD.replace("\"1G\"", "1.5"));
    assert!(e.contains("volume[0].size: 1.5 is not a whole number"), "{e}");
    let e = err(&GOOD.replace("\"1G\"", "true"));
    assert!(e.contains("volume[0].size: invalid type: boolean `true`, expected a size: a whole number of bytes"), "{e}");
    let e = err(&GOOD.replace("\"1G\"", "\"1Q\""));
    assert!(e.contains("volume[0].size: \"1Q\": unknown unit"), "{e}");
    // Every field of the size type, in each section.
    for (section, field) in
        [("nbd", "max_inflight_bytes_per_connection"), ("replication", "max_lag_bytes"), ("replication", "max_inflight_bytes")]
    {
        let e = err(&GOOD.replace("[site]", &format!("[{section}]\n{field} = -1\n[site]")));
        assert!(e.contains(&format!("{section}.{field}: -1 is negative")), "{e}");
    }
    let e = err(&GOOD.replace("size", "sise"));
    assert!(e.contains("volume[0].sise: unknown field `sise`, expected one of `name`"), "{e}");
    assert!(err(&GOOD.replace("size = \"1G\"", "")).contains("volume[0]: missing field `size`"));
    assert!(err("[site\nname = 1").starts_with("config file site.toml is not valid: TOML parse error at line 1"));

    for bad in ["..", ".", "../x", "-v", ".v", &"v".repeat(65)] {
        let e = err(&GOOD.replace("\"vol0\"", &format!("{bad:?}")));
        assert!(e.contains("volume[0].name: ") && e.contains("a name is 1 to 64 characters"), "{bad}: {e}");
    }
    let e = err(&GOOD.replace("\"dc1\"", "\"..\""));
    assert!(e.contains("site.name: \"..\" is not allowed: it starts with \".\""), "{e}");
    let e = err(&GOOD.replace("\"dc1\"", "\"dc1..x\""));
    assert!(e.contains("site.name: \"dc1..x\" is not a DNS name"), "{e}");
}

/// The example configs in deploy/ are what operators copy: they must stay valid.
#[test]
fn the_example_configs_are_valid() {
    for (name, text) in [
        ("site.example.toml", include_str!("../../../deploy/site.example.toml")),
        ("quickstart.toml", include_str!("../../../deploy/quickstart.toml")),
        ("dc1.toml", include_str!("../../../deploy/dc1.toml")),
        ("dc2.toml", include_str!("../../../deploy/dc2.toml")),
    ] {
        let c = parse(text).unwrap_or_else(|e| panic!("deploy/{name}: {e}"));
        assert!(!c.volumes.is_empty());
    }
    // The site configs inside the Kubernetes ConfigMaps: the block under `<site>.toml: |`.
    for (name, yaml) in
        [("k8s/dc1.yaml", include_str!("../../../deploy/k8s/dc1.yaml")), ("k8s/dc2.yaml", include_str!("../../../deploy/k8s/dc2.yaml"))]
    {
        let start = yaml.find(".toml: |\n").unwrap_or_else(|| panic!("deploy/{name} has no site config")) + ".toml: |\n".len();
        let toml: String = yaml[start..]
            .lines()
            .take_while(|l| l.starts_with("    ") || l.is_empty())
            .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
            .collect();
        let c = parse(&toml).unwrap_or_else(|e| panic!("deploy/{name}'s config: {e}"));
        assert!(c.peer.is_some() && c.admin.is_some(), "deploy/{name}");
    }
}

#[test]
fn a_peer_needs_tls_and_state_and_the_record_must_cover_the_lag() {
    let peer = r#"
        [peer]
        name = "dc2"
        address = "127.0.0.1:7401"
        listen = "127.0.0.1:7400"
        initial_role = "primary"
    "#;
    let tls = "[tls]\nca = \"ca.pem\"\ncert = \"dc1.pem\"\nkey = \"dc1.key\"\n";
    let state = GOOD.replace("name = \"dc1\"", "name = \"dc1\"\nstate_dir = \"state\"");
    let err = |text: &str| parse(text).unwrap_err().to_string();
    assert!(err(&format!("{GOOD}{peer}")).contains("needs [tls]"));
    assert!(err(&format!("{GOOD}{peer}{tls}")).contains("state_dir"));
    assert!(err(&format!("{GOOD}{tls}")).contains("need a [peer]"));
    assert!(err(&format!("{GOOD}[replication]\nmode = \"sync\"\n")).contains("need a [peer]"));
    let c = parse(&format!("{state}{peer}{tls}")).unwrap();
    assert!(!c.allow_insecure_key_permissions, "secrets others can read are refused by default");
    let allow = state.replace("state_dir", "allow_insecure_key_permissions = true\nstate_dir");
    assert!(parse(&format!("{allow}{peer}{tls}")).unwrap().allow_insecure_key_permissions);
    assert!(err(&format!("{state}{}{tls}", peer.replace("\"dc2\"", "\"x-\""))).contains("peer.name: \"x-\" is not a DNS name"));
    let p = c.peer.unwrap();
    assert_eq!((p.name.as_str(), p.initial_role, p.ca), ("dc2", Role::Primary, PathBuf::from("/etc/geomirror/ca.pem")));
    assert_eq!(c.volumes[0].core.mode, Mode::Predictive);
    let small = format!("{state}{peer}{tls}[replication]\nrecord_capacity_extents = 100\n");
    assert!(err(&small).contains("cannot hold max_lag_bytes"), "{}", err(&small));
    assert!(err(&format!("{state}{peer}{tls}[replication]\nmode = \"fast\"\n")).contains("unknown variant"));
    assert!(err(&format!("{state}{}{tls}", peer.replace("dc2", "dc1"))).contains("another site"));
    let degrade = format!("{state}{peer}{tls}[replication]\non_link_loss = \"degrade\"\nlink_loss_deadline_ms = 5000\n");
    assert!(err(&degrade).contains("idle_timeout_ms"), "{}", err(&degrade));
    assert_eq!(c.volumes[0].core.link_loss_detection_skew, Duration::from_secs(10), "the skew is the idle timeout");
    assert_eq!(p.tuning.bulk_bytes_per_sec, Some(125_000_000 * 92 / 100), "bulk is paced at 92% of 1000 Mbit/s");
    let pace = format!("{state}{peer}{tls}[link]\nbulk_pace_percent = 101\n");
    assert!(err(&pace).contains("link.bulk_pace_percent"), "{}", err(&pace));
}

#[test]
fn a_policy_is_one_of_its_lowercase_names_and_a_wrong_one_says_which() {
    let peer = "[peer]\nname = \"dc2\"\naddress = \"127.0.0.1:7401\"\nlisten = \"127.0.0.1:7400\"\ninitial_role = \"primary\"\n";
    let tls = "[tls]\nca = \"ca.pem\"\ncert = \"dc1.pem\"\nkey = \"dc1.key\"\n";
    let site = format!("{}{peer}{tls}", GOOD.replace("name = \"dc1\"", "name = \"dc1\"\nstate_dir = \"state\""));
    let with = |section: &str| parse(&format!("{site}{section}"));
    let c = with("[replication]\nmode = \"async\"\nflush_policy = \"remote\"\non_lag_full = \"resync\"\n").unwrap();
    let core = &c.volumes[0].core;
    assert_eq!((core.mode, core.flush_policy, core.on_lag_full), (Mode::Async, FlushPolicy::Remote, LagPolicy::Resync));
    let said = |section: &str| with(section).unwrap_err().to_string();
    let expected = |field: &str, got: &str, names: &str| format!("{field}: unknown variant `{got}`, expected {names}");
    for (section, field, got, names) in [
        ("[replication]\nmode = \"fast\"\n", "replication.mode", "fast", "one of `predictive`, `sync`, `async`"),
        // A site without a peer is standalone; a config cannot ask for it.
        ("[replication]\nmode = \"standalone\"\n", "replication.mode", "standalone", "one of `predictive`, `sync`, `async`"),
        ("[replication]\nflush_policy = \"Local\"\n", "replication.flush_policy", "Local", "`local` or `remote`"),
        ("[replication]\non_link_loss = \"wait\"\n", "replication.on_link_loss", "wait", "`block` or `degrade`"),
        ("[replication]\non_lag_full = \"drop\"\n", "replication.on_lag_full", "drop", "`throttle` or `resync`"),
    ] {
        assert!(said(section).contains(&expected(field, got, names)), "{}", said(section));
    }
    let role = parse(&site.replace("initial_role = \"primary\"", "initial_role = \"witness\"")).unwrap_err().to_string();
    assert!(role.contains(&expected("peer.initial_role", "witness", "`primary` or `secondary`")), "{role}");
}

#[test]
fn sizes() {
    assert_eq!(parse_size("4096"), Ok(4096));
    assert_eq!(parse_size("64K"), Ok(65536));
    assert_eq!(parse_size("1MiB"), Ok(1 << 20));
    assert_eq!(parse_size("2 G"), Ok(2 << 30));
    assert!(matches!(parse_size("1X"), Err(SizeError::UnknownUnit { .. })));
    assert!(matches!(parse_size("99999999999T"), Err(SizeError::TooLarge { .. })));
}
