//! The CLI as a shell user runs it.

use std::process::Stdio;

use crate::must_node_with_volume;

/// `lifeboat node list | head -1` and the like: once the reader has gone,
/// the command's next print ends it quietly with 141, the status a shell
/// reports for a tool killed by SIGPIPE, not by a panic on EPIPE (exit 101
/// and a backtrace on stderr).
#[test]
fn output_into_a_pipe_whose_reader_left_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let node = must_node_with_volume(dir.path(), &dir.path().join("data"), "", "16MiB");
    for args in [
        &["node", "list"][..],
        &["--output", "json", "volume", "list"],
    ] {
        // The reader is gone before the command starts: its first print
        // meets a closed pipe.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = node
            .cli_command(node.token.as_deref(), args)
            .stdout(Stdio::from(writer))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(141),
            "lifeboat {args:?} ends as a tool killed by SIGPIPE, not {:?}: {stderr}",
            out.status
        );
        assert!(stderr.is_empty(), "nothing on stderr: {stderr}");
    }
}
