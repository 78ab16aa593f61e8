import ArgumentParser
import CairnCore
import Foundation
import QEMU

/// `cairn thaw-watchdog --socket PATH --after SECONDS`: the process `QEMU.ThawWatchdog.spawn`
/// starts before Cairn freezes a guest. It sleeps, then thaws the guest through its agent
/// unless Cairn killed it first (after its own thaw). Hidden: nobody types it.
struct ThawWatchdog: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "thaw-watchdog",
        abstract: "Thaw a guest's file systems after a delay unless killed first (started by Cairn itself).",
        discussion: """
        Sleeps SECONDS, then connects to the guest agent's socket (waiting while another \
        client holds it), asks guest-fsfreeze-status and sends guest-fsfreeze-thaw when the \
        guest is frozen. Cairn starts it detached before a freeze and kills it after its thaw, \
        so a guest is thawed even when Cairn dies while the guest is frozen.
        """,
        shouldDisplay: false
    )

    @Option(name: .long, help: ArgumentHelp("The guest agent's unix socket (the host side of org.qemu.guest_agent.0).", valueName: "path"))
    var socket: String

    @Option(name: .long, help: ArgumentHelp("Seconds to wait before thawing.", valueName: "seconds"))
    var after: Double

    func validate() throws {
        guard after.isFinite, after >= 0 else { throw ValidationError("--after must be a number of seconds >= 0") }
        guard !socket.isEmpty else { throw ValidationError("--socket must name the guest agent's socket") }
    }

    func run() throws {
        // Standard error is /dev/null when Cairn spawned this; by hand, the outcome shows.
        switch try QEMU.ThawWatchdog.thawWhenDue(agentSocket: socket, after: after) {
        case nil: printError("cairn thaw-watchdog: the guest was not frozen")
        case let n?: printError("cairn thaw-watchdog: thawed \(n) file system\(n == 1 ? "" : "s")")
        }
    }
}
