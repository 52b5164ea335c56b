//! The `geomirror` command.
//!
//! Owns: argument parsing, help text and human-readable output. Must not: hold replication
//! logic; every command here calls into `geomirror-core` or `geomirror-sim`.

mod admin_cmd;
mod demo;
mod verify_cmd;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use geomirror_sim::replay::{compare, format_bytes, markdown_table, ReplaySettings, Source};
use geomirror_sim::seeds::run_parallel_with_progress;
use geomirror_sim::{describe_failure, read_trace, run, SeedTotals, SimConfig, TraceFormat, Workload};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// The version `--version` prints; a build with the core's deliberate bugs (the mutation
/// tests' feature) says so, and the e2e tests refuse to run such a binary.
const VERSION: &str = if geomirror_core::MUTATIONS_COMPILED_IN {
    concat!(env!("CARGO_PKG_VERSION"), " (mutations compiled in: deliberate bugs, not for serving hosts)")
} else {
    env!("CARGO_PKG_VERSION")
};

#[derive(Parser)]
#[command(
    name = "geomirror",
    version = VERSION,
    about = "Predictive geo-replication of block volumes between two datacenters",
    long_about = "geomirror mirrors block volumes from a primary site to a secondary site. The secondary keeps a \
durable, predictive record of the extents the host is about to write: writes to recorded extents are \
acknowledged at local-disk speed and shipped asynchronously; a write to an unrecorded extent first updates \
the record synchronously. So the secondary always knows a superset of what may differ between the sites, \
and failback copies only that.\n\n\
Commands: `demo` starts two sites on this machine, for a first look; `run` starts a site from its config file and serves its volumes over NBD, mirrored to its peer; \
`adopt` puts a volume that already holds data under protection; \
`certs` makes the deployment's certificates; `status`, `promote`, `demote`, `failback`, `switchover`, `resume`, `verify`, `rebuild` \
and `resolve-split-brain` talk to a running site's admin API (docs/operations.md is the runbook); `wan-emu` \
puts an emulated WAN between two sites on one machine; `replay` measures prediction on a workload or a block \
trace; `simulate` runs the deterministic two-site fault simulation.",
    after_help = "Examples:\n  geomirror demo\n  geomirror run --config /etc/geomirror/site.toml\n  geomirror status --config /etc/geomirror/dc2.toml --cert admin-ops.pem --key admin-ops.key\n  geomirror promote --config /etc/geomirror/dc2.toml --cert admin-ops.pem --key admin-ops.key --reason \"dc1 lost\"\n  geomirror replay --workload sequential --workload zipf\n  geomirror replay --trace msr.csv --format msr --capacities 256,4096\n  geomirror simulate --seeds 1000\n  geomirror simulate --seed 42 --trace 2> seed42.log"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a complete two-site deployment on this machine, to try geomirror in minutes.
    ///
    /// Makes a CA, site certificates and tokens, writes two site configs (dc1 primary, dc2
    /// secondary) and a prometheus.yml into --dir, and starts, as separate processes, a WAN
    /// emulator each way (--rtt-ms, --rate-mbps) and both sites. Then it prints where to
    /// connect: each site's NBD URL, admin API and metrics, and a walkthrough (write with
    /// qemu-io, kill -9 the primary, promote the secondary, bring the old one back, fail
    /// back). Ctrl-C stops both sites cleanly, the primary first.
    ///
    /// The configs are ordinary: start a site by hand afterwards with
    /// `geomirror run --config DIR/dc1.toml`. A second `geomirror demo` reuses the directory,
    /// volumes and roles included; delete it to start afresh.
    #[command(verbatim_doc_comment)]
    Demo(demo::DemoArgs),
    /// Start a site from its config file and serve its volumes over NBD until Ctrl-C.
    ///
    /// First checks the config and every file it names (media directories, certificates, a
    /// key and token files readable by their owner only) and stops, creating nothing, at
    /// the first problem, naming its field (docs/operations.md, "What a site checks before
    /// it starts"). Then opens (or creates, sparse) each volume's media file, listens for
    /// NBD clients and prints one `nbd://` URL per volume on standard output; with a [peer],
    /// also the UDP replication address and the admin API's https:// address, which also
    /// serves Prometheus metrics at /metrics (docs/operations.md, "Watching"). Logs go to
    /// standard error; set RUST_LOG=debug for every refused request. On Ctrl-C or SIGTERM
    /// the site stops accepting, answers every request it has read, syncs the media and
    /// exits 0.
    ///
    /// The config is TOML; `deploy/site.example.toml` documents every field. A minimal one:
    ///
    ///   [site]
    ///   name = "dc1"
    ///   [nbd]
    ///   listen = "127.0.0.1:10809"
    ///   [[volume]]
    ///   name = "vol0"
    ///   media = "vol0.img"
    ///   size = "8G"
    #[command(verbatim_doc_comment)]
    Run(RunArgs),
    /// Put a volume whose media already holds data under protection: this site becomes its
    /// primary, and its peer gets a full verified copy of it.
    ///
    /// Run it once, on the site whose data is to be kept, while that site is stopped. It checks
    /// first, and creates nothing unless every check passes: the site has a [peer]; the volume
    /// is in its config; its media file exists at the configured size, holds data and is not
    /// in use; and the volume has no replication state yet. Then it creates the volume's store
    /// as a primary that owes its peer a full verified resync, and prints what happens next.
    ///
    /// Then start this site and its peer. The peer needs a new, empty state directory; its
    /// media may be blank, or a copy made earlier (a restored backup, a disk shipped by hand).
    /// At the first handshake the peer marks itself inconsistent. The primary compares every
    /// extent by digest and copies only the blocks that differ, while it serves its hosts;
    /// host writes during the copy follow the normal write path and are never overwritten by
    /// it. Until the copy ends the peer refuses promotion without --force, and its
    /// `geomirror status` says "inconsistent (syncing)"; then "consistent, record
    /// authoritative". The primary's status shows the copy's progress. A peer that kept the
    /// state of an earlier pairing stops both sites until one is promoted with --force: give
    /// it an empty state directory.
    ///
    /// Never adopt on a site whose peer may hold newer data: adoption makes this media the
    /// truth. A site that lost its state over its media starts as an amnesiac secondary on its
    /// own; see docs/operations.md, "Protecting a volume that holds data" and "Amnesia".
    ///
    /// Example:
    ///
    ///   geomirror adopt --config /etc/geomirror/dc1.toml --volume vol0
    #[command(verbatim_doc_comment)]
    Adopt(AdoptArgs),
    /// Make the deployment's certificates: a CA, one per site, and admin client certificates.
    ///
    /// Writes PEM files into --dir: ca.pem and ca.key (made once; when they exist they are
    /// reused, so that sites added later share the CA), <site>.pem and <site>.key for each
    /// --site, admin-<name>.pem and admin-<name>.key for each --admin. Private keys are
    /// written readable by the owner only. Existing site or admin files are not replaced
    /// unless --force.
    ///
    /// A site certificate carries the DNS name <site> and the URI geomirror:site:<site>, the
    /// identity its peer checks. An admin certificate carries geomirror:admin:<name> and is
    /// valid for the admin API only. certs/README.md shows how to use your own PKI instead.
    Certs(CertsArgs),
    /// Emulate a WAN between two sites on one machine: a UDP relay with delay, jitter, loss
    /// and a bandwidth cap.
    ///
    /// Point the primary's peer address at --listen and the relay forwards to --forward (the
    /// secondary's replication address), and back. Each direction gets half the RTT, plus
    /// or minus the jitter (the stream is never reordered), loses --loss-percent of its
    /// datagrams, and carries at most --rate-mbps with a queue of --queue-bytes (tail drop
    /// beyond it). The link can be cut and restored: SIGUSR1 cuts, SIGUSR2 restores, and the
    /// --control socket takes lines `cut`, `restore`, `status`, `rtt-ms N`, `loss-percent P`
    /// and `rate-mbps R` (try it with `nc 127.0.0.1 7100`).
    ///
    /// The kernel's netem does the same in production-like labs; this needs no privileges.
    #[command(name = "wan-emu")]
    WanEmu(WanEmuArgs),
    /// Replay a workload through the replication core (no I/O) and compare predictors.
    ///
    /// Runs claim 19's k-next predictor and the adaptive predictor side by side, for every
    /// combination of extent size and record capacity given, and prints the hit ratio (writes
    /// acknowledged without a round trip), the record's largest size, and the failback debt
    /// when the workload ends. Every figure is a count: the same input gives the same table.
    Replay(ReplayArgs),
    /// Run the deterministic two-site simulation under faults and check every oracle.
    ///
    /// Each seed draws a configuration (mode, link-loss policy, record capacity, workload,
    /// faults, and a scenario: steady, failover, split brain or switchover) and checks the
    /// oracles O1-O9 (docs/architecture.md, "The oracles") after every event. A failing seed prints the command that
    /// replays it; `--seed N --trace` prints every event of one seed to stderr.
    Simulate(SimulateArgs),
    /// Show a site's role, epoch, link, hit and miss counts, record, lag and failback debt.
    ///
    /// Asks the site's admin API (HTTPS). With --config the address, CA and site name come
    /// from the site's config file; credentials are an admin certificate (--cert, --key,
    /// made by `geomirror certs --admin NAME`) or --token-file.
    Status(admin_cmd::AdminArgs),
    /// Promote a secondary to primary: it bumps the epoch, stops taking the old primary's
    /// traffic and serves its NBD exports.
    ///
    /// Idempotent: a site that is already primary says so and changes nothing. Refused while
    /// the primary of the current epoch is connected and alive, since that would make two
    /// writers: stop or lose it first, or pass --force. After a degrade (the primary wrote
    /// without the record) the promotion warns loudly that the record is not authoritative.
    /// The site logs who asked and why.
    Promote {
        #[command(flatten)]
        admin: admin_cmd::AdminArgs,
        /// Promote although the primary of this epoch is connected (two writers: a split
        /// brain that an operator must then resolve).
        #[arg(long)]
        force: bool,
        /// Why, for the site's log (e.g. "dc1 lost power, ticket 4711").
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Demote a primary to secondary, for a planned switchover: it stops taking writes, waits
    /// until its peer has applied every one, and becomes a secondary of the same epoch. Then
    /// promote the peer.
    ///
    /// If the peer has not applied everything within --drain-timeout, the demotion is
    /// abandoned and the site serves again.
    Demote {
        #[command(flatten)]
        admin: admin_cmd::AdminArgs,
        #[arg(long, default_value = "")]
        reason: String,
        /// Seconds to wait for the peer to apply every write, 1 to 3600.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
        drain_timeout: u64,
    },
    /// After a split brain, keep this site's data: the other site saves its own divergent
    /// extents aside (listed in its status) and is resynced from this one.
    ///
    /// A split brain (both sites took writes under different epochs) is reported by both
    /// sites' status and never resolved on its own. Run this against the site whose data
    /// wins: the primary of the newer epoch.
    #[command(name = "resolve-split-brain")]
    ResolveSplitBrain {
        #[command(flatten)]
        admin: admin_cmd::AdminArgs,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// End a drain: the primary takes writes again.
    ///
    /// Ends a drain left behind by an interrupted switchover, and abandons a drain or a
    /// demotion still waiting for the peer (which then fails, saying a resume ended it). A
    /// demotion already made durable is past the point of return and completes.
    Resume {
        #[command(flatten)]
        admin: admin_cmd::AdminArgs,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Compare the two sites' images online, by digest, while the host keeps writing.
    ///
    /// Run it against the primary. It reads each extent of the range and sends its block
    /// digests to the secondary at that point of the write order, so writes in flight never
    /// show as differences. Whatever differs makes the secondary call its image inconsistent
    /// (a promotion then says so loudly) and is copied from the primary with --repair, or by
    /// the next resync otherwise. Prints the ranges that differ. Exit code: 0 when
    /// equal, 3 when something differs, 4 when cancelled (--cancel) before the whole range was
    /// compared, 1 on error (2 on a usage error). Checks share the link with the host's
    /// writes; a verify does not survive a restart of the primary.
    ///
    ///   geomirror verify --config dc1.toml                  # the whole volume
    ///   geomirror verify --config dc1.toml --offset 1G --length 64M
    ///   geomirror verify --config dc1.toml --repair
    #[command(verbatim_doc_comment)]
    Verify {
        #[command(flatten)]
        admin: admin_cmd::AdminArgs,
        /// The volume (default: the site's only volume).
        #[arg(long)]
        volume: Option<String>,
        /// Where the range starts, in bytes (suffixes K, M, G, T: powers of 1024). It is widened
        /// to whole extents.
        #[arg(long, value_parser = geomirror_node::config::parse_size)]
        offset: Option<u64>,
        /// How long the range is (default: to the end of the volume).
        #[arg(long, value_parser = geomirror_node::config::parse_size)]
        length: Option<u64>,
        /// Copy what differs from the primary to the secondary as soon as it is found.
        #[arg(long)]
        repair: bool,
        /// Start it and return; follow it with `geomirror status`.
        #[arg(long, conflicts_with = "cancel")]
        no_wait: bool,
        /// Stop the running verify where it is.
        #[arg(long, conflicts_with_all = ["repair", "offset", "length"])]
        cancel: bool,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Show, or approve, the full sync a rebuilt peer waits for.
    ///
    /// When the peer comes back with a new store (a new disk or machine, or its state
    /// directory lost), the primary owes it a full sync of the whole volume. With `[replication]
    /// rebuild = "approve"` (the default) that sync waits for an operator: without --approve
    /// this prints the peer's new store id, the bytes the sync reads and how long it takes at
    /// the paced link rate; --approve STORE_ID starts it, and only if STORE_ID is the peer's
    /// store (a wrong id changes nothing). Until then the peer applies new writes but is not
    /// trusted: promoting it needs --force.
    Rebuild {
        #[command(flatten)]
        admin: admin_cmd::AdminArgs,
        #[arg(long)]
        volume: Option<String>,
        /// The peer's new store id, as this command (or `geomirror status`) shows it.
        #[arg(long, value_name = "STORE_ID")]
        approve: Option<String>,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Follow the failback onto the returning old primary, or estimate it (--dry-run).
    ///
    /// Run it against the promoted site. Once the old primary is back, it finds the newer
    /// epoch, fences itself and joins as a secondary; the promoted site then copies it the
    /// failback set only: the record at promotion plus every extent written since. Whatever
    /// the old primary held there is saved aside first. --dry-run prints the bytes a failback
    /// would copy now and how long that takes at the paced link rate; otherwise a progress
    /// bar follows the copy until both sites hold the same data.
    Failback {
        #[command(flatten)]
        admin: admin_cmd::AdminArgs,
        /// Only print how many bytes a failback would copy now and how long that takes at
        /// the paced link rate; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Swap roles with zero data loss: drain the primary, check that both sites hold the same
    /// data on every recorded extent, demote it, promote its peer.
    ///
    /// --config names the current primary and --peer-config the site to become primary; the
    /// credentials serve both. If the recorded extents differ, nothing is swapped and the
    /// primary serves again. Writes wait (and may time out at the host) while it drains.
    Switchover {
        #[command(flatten)]
        admin: admin_cmd::AdminArgs,
        #[command(flatten)]
        peer: admin_cmd::PeerArgs,
        #[arg(long, default_value = "")]
        reason: String,
        /// Seconds to wait for the peer to apply every write, 1 to 3600.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
        drain_timeout: u64,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum WorkloadArg {
    Sequential,
    Strided,
    Zipf,
    Uniform,
    Mixed,
}

impl WorkloadArg {
    fn workload(self) -> Workload {
        match self {
            WorkloadArg::Sequential => Workload::Sequential,
            WorkloadArg::Strided => Workload::Strided,
            WorkloadArg::Zipf => Workload::Zipf,
            WorkloadArg::Uniform => Workload::Uniform,
            WorkloadArg::Mixed => Workload::Mixed,
        }
    }

    fn default_write_bytes(self) -> u64 {
        match self {
            WorkloadArg::Sequential => 1 << 20,
            WorkloadArg::Strided => 256 << 10,
            _ => 4096,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    /// `timestamp,op,size,lba` with lba in 512-byte sectors and op R or W.
    Cloudphysics,
    /// MSR Cambridge: `Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime`.
    Msr,
}

#[derive(Args)]
struct ReplayArgs {
    /// Synthetic workload to replay; repeat for several. Default: all five.
    #[arg(long, value_enum)]
    workload: Vec<WorkloadArg>,
    /// Replay the writes of this block-trace CSV instead of a synthetic workload.
    #[arg(long, conflicts_with = "workload")]
    trace: Option<PathBuf>,
    /// Format of --trace.
    #[arg(long, value_enum, default_value = "cloudphysics", requires = "trace")]
    format: FormatArg,
    /// Host writes per synthetic run (or the most read from a trace).
    #[arg(long, default_value_t = 2000)]
    writes: u64,
    /// Size of each synthetic write, e.g. 4K or 1M. Default: 1M sequential, 256K strided, 4K otherwise.
    #[arg(long, value_parser = geomirror_node::config::parse_size)]
    write_size: Option<u64>,
    /// Extent sizes to compare, comma-separated (powers of two, 64K to 64M).
    #[arg(long, value_delimiter = ',', value_parser = geomirror_node::config::parse_size, default_values = ["256K", "1M"])]
    extent_sizes: Vec<u64>,
    /// Record capacities to compare, in extents, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [64u64, 256, 1024])]
    capacities: Vec<u64>,
    /// Volume size, e.g. 4G. Keep it larger than the writes' span, so that no stream wraps round
    /// the volume onto extents it recorded earlier (that would flatter both predictors).
    #[arg(long, value_parser = geomirror_node::config::parse_size, default_value = "4G")]
    volume_size: u64,
    /// Round-trip time between the sites, in milliseconds.
    #[arg(long, default_value_t = 10)]
    rtt_ms: u64,
    /// Link bandwidth for bulk data, in megabits per second (0: unlimited).
    #[arg(long, default_value_t = 1000)]
    link_mbps: u64,
    /// Unapplied bytes at which host writes are throttled, e.g. 64M.
    #[arg(long, value_parser = geomirror_node::config::parse_size, default_value = "64M")]
    max_lag: u64,
    /// Host writes in flight at once.
    #[arg(long, default_value_t = 8)]
    queue_depth: usize,
    /// Age in milliseconds at which clean generations leave the record without capacity
    /// pressure (0: keep them until the record fills).
    #[arg(long, default_value_t = 1000)]
    max_age_ms: u64,
    /// Claim 19's k: extents the k-next predictor adds after each miss.
    #[arg(long, default_value_t = 4)]
    k: u32,
    /// Also write the table as Markdown to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Print the record's size at ten points of each run.
    #[arg(long)]
    series: bool,
}

#[derive(Args)]
struct RunArgs {
    /// The site's config file (TOML).
    #[arg(long, short)]
    config: PathBuf,
}

#[derive(Args)]
struct AdoptArgs {
    /// The site's config file (TOML).
    #[arg(long, short)]
    config: PathBuf,
    /// The volume to adopt (by its name in the config); every volume of the site when omitted.
    #[arg(long)]
    volume: Option<String>,
}

#[derive(Args)]
struct CertsArgs {
    /// Directory to write into (created if missing).
    #[arg(long)]
    dir: PathBuf,
    /// A site to make a certificate for; repeat for each (e.g. --site dc1 --site dc2).
    #[arg(long = "site")]
    sites: Vec<String>,
    /// An operator to make an admin client certificate for; repeatable.
    #[arg(long = "admin")]
    admins: Vec<String>,
    /// The deployment's name, shown in the CA's subject.
    #[arg(long, default_value = "geomirror")]
    deployment: String,
    /// Days the site and admin certificates are valid (the CA: ten years).
    #[arg(long, default_value_t = 365)]
    days: i64,
    /// Replace existing site and admin files.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct WanEmuArgs {
    /// UDP address to listen on (the primary connects here).
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// UDP address to forward to (the secondary's replication port).
    #[arg(long)]
    forward: std::net::SocketAddr,
    /// Round-trip time added, in milliseconds (half each way).
    #[arg(long, default_value_t = 50.0)]
    rtt_ms: f64,
    /// Jitter per direction, in milliseconds (uniform, plus or minus).
    #[arg(long, default_value_t = 0.0)]
    jitter_ms: f64,
    /// Datagrams lost per direction, in percent.
    #[arg(long, default_value_t = 0.0)]
    loss_percent: f64,
    /// Bandwidth per direction in Mbit/s; 0 is unlimited.
    #[arg(long, default_value_t = 0.0)]
    rate_mbps: f64,
    /// Bytes a direction queues before dropping (with --rate-mbps).
    #[arg(long, value_parser = geomirror_node::config::parse_size, default_value = "4M")]
    queue_bytes: u64,
    /// TCP address of the control socket (e.g. 127.0.0.1:7100).
    #[arg(long)]
    control: Option<std::net::SocketAddr>,
    /// Seed of the loss and jitter draws, for a repeatable run.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Args)]
struct SimulateArgs {
    /// How many seeds to run.
    #[arg(long, default_value_t = 1000)]
    seeds: u64,
    /// First seed.
    #[arg(long, default_value_t = 0)]
    start: u64,
    /// Run exactly this seed (prints its full report).
    #[arg(long)]
    seed: Option<u64>,
    /// With --seed: print every event and action to stderr.
    #[arg(long, requires = "seed")]
    trace: bool,
    /// Also print each seed's trace hash, one `seed hash` line per seed in seed order: two
    /// builds that print the same lines behaved identically on those seeds (a refactor's
    /// check that it changed no behaviour).
    #[arg(long, conflicts_with = "seed")]
    hashes: bool,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Run(a) => run_site(a),
        Command::Adopt(a) => adopt(a),
        Command::Demo(a) => demo::demo(a),
        Command::Certs(a) => certs(a),
        Command::WanEmu(a) => wan_emu(a),
        Command::Replay(a) => replay(a),
        Command::Simulate(a) => simulate(a),
        Command::Status(a) => admin_cmd::status(a),
        Command::Promote { admin, force, reason } => admin_cmd::promote(admin, force, reason),
        Command::Demote { admin, reason, drain_timeout } => admin_cmd::demote(admin, reason, drain_timeout),
        Command::Failback { admin, dry_run } => admin_cmd::failback(admin, dry_run),
        Command::Rebuild { admin, volume, approve, reason } => verify_cmd::rebuild(admin, volume, approve, reason),
        Command::Verify { admin, volume, offset, length, repair, no_wait, cancel, reason } => {
            let code = verify_cmd::verify(admin, verify_cmd::VerifyArgs { volume, offset, length, repair, no_wait, cancel, reason })?;
            if code != 0 {
                std::process::exit(code);
            }
            Ok(())
        }
        Command::Resume { admin, reason } => admin_cmd::resume(admin, reason),
        Command::ResolveSplitBrain { admin, reason } => admin_cmd::resolve_split_brain(admin, reason),
        Command::Switchover { admin, peer, reason, drain_timeout } => admin_cmd::switchover(admin, peer, reason, drain_timeout),
    }
}

fn adopt(a: AdoptArgs) -> Result<()> {
    init_logging();
    let cfg = geomirror_node::config::SiteConfig::load(&a.config)?;
    let adopted = geomirror_node::adopt::adopt(&cfg, a.volume.as_deref())?;
    let peer = cfg.peer.as_ref().map_or("its peer", |p| p.name.as_str());
    let mut out = std::io::stdout().lock();
    for v in &adopted {
        writeln!(
            out,
            "{}/{}: adopted {} ({}, {} allocated) as the primary copy; store {} in {}",
            cfg.name,
            v.volume,
            v.media.display(),
            format_bytes(v.size_bytes),
            format_bytes(v.allocated_bytes),
            v.store,
            v.state_dir.display()
        )?;
    }
    writeln!(
        out,
        "Next: start this site (geomirror run --config {}) and {peer} with a new, empty state directory. {peer} marks itself \
         inconsistent at the first handshake; this site compares every extent by digest and copies the blocks that differ (at \
         most the allocated bytes above) while it serves. Until that ends {peer} refuses promotion without --force. Follow it \
         with geomirror status on {peer}: \"inconsistent (syncing)\" until the copy ends, then \"consistent, record \
         authoritative\".",
        a.config.display()
    )?;
    Ok(())
}

fn run_site(a: RunArgs) -> Result<()> {
    demo::stop_with_demo()?;
    init_logging();
    let cfg = geomirror_node::config::SiteConfig::load(&a.config)?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("geomirror").build().context("start the async runtime")?;
    runtime.block_on(async {
        let site = geomirror_node::site::RunningSite::start(cfg).await?;
        // Before the addresses are printed: whoever waits for them may stop the site at once,
        // and a signal without a handler would end it without a clean stop.
        use tokio::signal::unix::{signal, SignalKind};
        let (mut int, mut term) = (signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?);
        let mut out = std::io::stdout().lock();
        let role = match site.role {
            geomirror_core::Role::Primary => "primary",
            geomirror_core::Role::Secondary => "secondary",
        };
        if let Some(a) = site.link_addr {
            writeln!(out, "site {} ({role}): replication at udp {a}", site.name)?;
        }
        if let Some(a) = site.admin_addr {
            writeln!(out, "site {} ({role}): admin API at https://{a}", site.name)?;
        }
        for v in &site.volumes {
            writeln!(
                out,
                "site {} ({role}): volume {} ({}) at {}",
                site.name,
                v.name(),
                format_bytes(v.size_bytes()),
                site.nbd_url(v.name())
            )?;
        }
        out.flush()?;
        drop(out);
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping: finishing requests in flight and syncing media");
        site.stop().await;
        Ok(())
    })
}

fn certs(a: CertsArgs) -> Result<()> {
    use geomirror_node::certs::{write_deployment, Validity};
    if a.sites.is_empty() && a.admins.is_empty() {
        bail!("nothing to make: name at least one --site or --admin (e.g. --site dc1 --site dc2 --admin ops)");
    }
    if !(1..=3650).contains(&a.days) {
        bail!("--days must be between 1 and 3650, got {}", a.days);
    }
    let w = write_deployment(&a.dir, &a.deployment, &a.sites, &a.admins, Validity::days_from_now(a.days), a.force)?;
    let mut out = std::io::stdout().lock();
    if w.ca_reused {
        writeln!(out, "using the existing CA in {}", a.dir.display())?;
    }
    for f in &w.files {
        writeln!(out, "wrote {}", f.display())?;
    }
    Ok(())
}

fn wan_emu(a: WanEmuArgs) -> Result<()> {
    use geomirror_node::wan::{LinkConfig, WanEmu};
    demo::stop_with_demo()?;
    let ms = |name: &str, v: f64| -> Result<Duration> {
        if !(0.0..=10_000.0).contains(&v) {
            bail!("{name} must be between 0 and 10000 ms, got {v}");
        }
        Ok(Duration::from_secs_f64(v / 1000.0))
    };
    if !(0.0..=100.0).contains(&a.loss_percent) {
        bail!("--loss-percent must be between 0 and 100, got {}", a.loss_percent);
    }
    if !(0.0..=100_000.0).contains(&a.rate_mbps) {
        bail!("--rate-mbps must be between 0 (unlimited) and 100000, got {}", a.rate_mbps);
    }
    let link = LinkConfig {
        delay: ms("--rtt-ms", a.rtt_ms)? / 2,
        jitter: ms("--jitter-ms", a.jitter_ms)?,
        loss: a.loss_percent / 100.0,
        rate_bytes_per_sec: (a.rate_mbps > 0.0).then(|| (a.rate_mbps * 1e6 / 8.0) as u64),
        queue_bytes: a.queue_bytes,
    };
    init_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("start the async runtime")?;
    runtime.block_on(async {
        let emu =
            WanEmu::start(a.listen, a.forward, link, a.control, a.seed).await.with_context(|| format!("cannot listen on {}", a.listen))?;
        // Every listener before the addresses are printed, and each kept for the whole run: a
        // signal sent as soon as they appear, or between two turns of the loop, is not lost.
        use tokio::signal::unix::{signal, SignalKind};
        let (mut cut, mut restore, mut term, mut int) = (
            signal(SignalKind::user_defined1())?,
            signal(SignalKind::user_defined2())?,
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        );
        println!("wan-emu: udp {} -> {}; {}", emu.listen, a.forward, emu.status());
        if let Some(c) = emu.control {
            println!("wan-emu: control at tcp {c} (cut, restore, status, rtt-ms N, loss-percent P, rate-mbps R)");
        }
        loop {
            tokio::select! {
                _ = cut.recv() => { emu.set_cut(true); tracing::info!("link cut (SIGUSR1)"); }
                _ = restore.recv() => { emu.set_cut(false); tracing::info!("link restored (SIGUSR2)"); }
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        println!("wan-emu: {}", emu.status());
        Ok(())
    })
}

/// Logs to standard error; RUST_LOG overrides the default level (info).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal()).init();
}

fn replay(a: ReplayArgs) -> Result<()> {
    if !a.volume_size.is_multiple_of(4096) || a.volume_size == 0 {
        bail!("--volume-size must be a positive multiple of 4096 bytes");
    }
    for e in &a.extent_sizes {
        geomirror_core::Geometry::new(a.volume_size, *e).with_context(|| format!("extent size {}", format_bytes(*e)))?;
    }
    if a.capacities.iter().any(|c| *c < 8) {
        bail!("every capacity must be at least 8 extents");
    }
    if a.queue_depth == 0 || a.writes == 0 {
        bail!("--queue-depth and --writes must be at least 1");
    }
    if a.max_lag < (1 << 20) {
        bail!("--max-lag must be at least 1M");
    }
    let settings = ReplaySettings {
        volume_bytes: a.volume_size,
        queue_depth: a.queue_depth,
        rtt: Duration::from_millis(a.rtt_ms),
        link_bytes_per_sec: (a.link_mbps > 0).then_some(a.link_mbps * 1_000_000 / 8),
        max_lag_bytes: a.max_lag,
        clean_generation_max_age: (a.max_age_ms > 0).then(|| Duration::from_millis(a.max_age_ms)),
        k_next: a.k,
        seed: 1,
    };
    let sources: Vec<Source> = match &a.trace {
        Some(path) => {
            let file = std::fs::File::open(path).with_context(|| format!("opening trace {}", path.display()))?;
            let format = match a.format {
                FormatArg::Cloudphysics => TraceFormat::CloudPhysics,
                FormatArg::Msr => TraceFormat::Msr,
            };
            let ops = read_trace(std::io::BufReader::new(file), format, a.volume_size, a.writes as usize)
                .with_context(|| format!("reading trace {}", path.display()))?;
            let name = path.file_name().map_or("trace".into(), |n| n.to_string_lossy().into_owned());
            vec![Source::Trace { name, ops }]
        }
        None => {
            let kinds = if a.workload.is_empty() {
                vec![WorkloadArg::Sequential, WorkloadArg::Strided, WorkloadArg::Zipf, WorkloadArg::Uniform, WorkloadArg::Mixed]
            } else {
                a.workload.clone()
            };
            kinds
                .into_iter()
                .map(|k| Source::Synthetic {
                    workload: k.workload(),
                    writes: a.writes,
                    write_bytes: a.write_size.unwrap_or(k.default_write_bytes()),
                })
                .collect()
        }
    };
    let total = sources.len() * a.extent_sizes.len() * a.capacities.len() * 2;
    eprintln!(
        "replaying {} workload(s) x {} extent size(s) x {} capacit(ies) x 2 predictors = {total} runs, RTT {} ms, link {} Mbit/s, queue depth {}",
        sources.len(),
        a.extent_sizes.len(),
        a.capacities.len(),
        a.rtt_ms,
        a.link_mbps,
        a.queue_depth
    );
    let mut rows = Vec::new();
    for (i, source) in sources.iter().enumerate() {
        eprint!("[{}/{}] {} ... ", i + 1, sources.len(), source.name());
        std::io::stderr().flush().ok();
        let r = compare(source, &settings, &a.extent_sizes, &a.capacities);
        if r.iter().any(|(k, ad)| k.violations + ad.violations > 0) {
            bail!("an oracle failed during the replay of {}: this is a bug, please report it", source.name());
        }
        eprintln!("done");
        rows.extend(r);
    }
    let table = markdown_table(&rows);
    println!("{table}");
    if a.series {
        println!("record size (extents) at each tenth of the run:");
        for (k, ad) in &rows {
            println!("  {} {} cap {}: k-next {:?}", k.workload, format_bytes(k.extent_bytes), k.capacity_extents, k.record_over_time);
            println!("  {} {} cap {}: adaptive {:?}", ad.workload, format_bytes(ad.extent_bytes), ad.capacity_extents, ad.record_over_time);
        }
    }
    if let Some(path) = &a.markdown {
        std::fs::write(path, &table).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn simulate(a: SimulateArgs) -> Result<()> {
    if let Some(seed) = a.seed {
        let mut cfg = SimConfig::for_seed(seed);
        cfg.trace = a.trace;
        eprintln!(
            "seed {seed}: {:?} scenario, {:?} mode, workload {}, start {:?}",
            cfg.scenario,
            cfg.core.mode,
            cfg.workload.name(),
            cfg.initial
        );
        let r = run(cfg);
        println!("{r:#?}");
        if !r.violations.is_empty() {
            bail!("{}", describe_failure(&r));
        }
        println!("seed {seed} passed: {} events, trace hash {:016x}", r.events, r.trace_hash);
        return Ok(());
    }
    if a.seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    let seeds: Vec<u64> = (a.start..a.start + a.seeds).collect();
    let n = seeds.len();
    // A bar on a terminal; indicatif draws nothing when stderr is a pipe or a file.
    let bar = indicatif::ProgressBar::new(n as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{pos}/{len} seeds [{bar:40}] {per_sec} ({eta})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let reports = run_parallel_with_progress(&seeds, geomirror_sim::run_seed, |_| bar.inc(1));
    bar.finish_and_clear();
    let failed: Vec<_> = reports.iter().filter(|r| !r.violations.is_empty()).collect();
    if a.hashes {
        for r in &reports {
            println!("{} {:016x}", r.seed, r.trace_hash);
        }
    }
    println!("{}", SeedTotals::of(&reports));
    for r in &failed {
        println!("{}", describe_failure(r));
    }
    if !failed.is_empty() {
        bail!("{} of {n} seeds failed", failed.len());
    }
    println!("{n} passed, 0 failed");
    Ok(())
}
