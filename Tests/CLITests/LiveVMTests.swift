import CairnCore
import CairnTestSupport
import Foundation
import QEMU
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// `cairn backup --qmp` of a running qemu-system-x86_64 VM (TCG) whose guest keeps writing
/// numbered records during the backup (scripts/make-boot-vm.sh, boot-agent.raw): the restored
/// image must be the disk at one instant, shown by the records themselves.
@Suite(.serialized) struct LiveVMTests {
    /// The guest's marker layout (scripts/make-boot-vm.sh): a count at COUNT, record n at LOG + n*512.
    static func markers(diskSize: Int) -> (count: Int, log: Int) {
        let count = diskSize - MiB + 64 * KiB
        return (count, count + 4 * KiB)
    }

    /// Reads the count and the highest consecutive record from an image, and whether any
    /// record beyond count+1 exists (which a point-in-time image cannot hold).
    static func readMarkers(_ image: String, diskSize: Int) throws -> (count: Int, records: Int, beyond: Int?) {
        let m = markers(diskSize: diskSize)
        let f = try PosixFile(path: image, flags: O_RDONLY)
        func text(_ at: Int, _ n: Int) throws -> String {
            var b = [UInt8](repeating: 0, count: n)
            try b.withUnsafeMutableBytes { try f.pread(into: $0, at: UInt64(at)) }
            return String(decoding: b.prefix { $0 != 0x0A && $0 != 0 }, as: UTF8.self)
        }
        let c = try text(m.count, 32)
        guard c.hasPrefix("CAIRN-COUNT-"), let count = Int(c.dropFirst(12)) else { return (0, 0, nil) }
        var records = 0
        var beyond: Int?
        for n in 1...1500 {
            let r = try text(m.log + n * 512, 32)
            if r == String(format: "CAIRN-LOG-%08d", n) {
                if n == records + 1 { records = n }
                if n > count + 1 { beyond = n }
            } else if n > count + 2 {
                break
            }
        }
        return (count, records, beyond)
    }

    @Test func runningGuestIsCapturedAtOneInstant() throws {
        _ = try BootVM.disk()
        let vmDir = BootVM.directory
        let env = try CLIEnv("live-vm")
        let disk = env.file("vm.qcow2")
        try Tool.run("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", "\(vmDir)/boot-agent.raw", disk])
        let size = Int(try #require(FileManager.default.attributesOfItem(atPath: "\(vmDir)/boot-agent.raw")[.size] as? NSNumber).int64Value)
        let qmp = env.file("vm-qmp.sock"), qga = env.file("vm-qga.sock"), serial = env.file("serial.log")
        let p = Process()
        p.executableURL = URL(fileURLWithPath: try Tool.which("qemu-system-x86_64"))
        p.arguments = ["-accel", "tcg", "-machine", "q35", "-m", "256", "-nodefaults", "-display", "none", "-no-reboot", "-nic", "none",
                       "-serial", "file:\(serial)", "-qmp", "unix:\(qmp),server=on,wait=off",
                       "-blockdev", "driver=file,filename=\(disk),node-name=f0", "-blockdev", "driver=qcow2,file=f0,node-name=vda0",
                       "-device", "virtio-blk-pci,drive=vda0,id=vda,bootindex=0",
                       "-chardev", "socket,path=\(qga),server=on,wait=off,id=qga0", "-device", "virtio-serial-pci",
                       "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]
        p.standardInput = FileHandle.nullDevice
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) }; p.waitUntilExit() }
        func console() -> String { (try? String(contentsOfFile: serial, encoding: .utf8)) ?? "" }
        func lastTick() -> Int {
            console().components(separatedBy: .newlines).compactMap { l in l.hasPrefix("CAIRN-TICK ") ? Int(l.dropFirst(11).trimmingCharacters(in: .whitespaces)) : nil }.last ?? 0
        }
        let deadline = Date().addingTimeInterval(90)
        while (lastTick() < 3 || !console().contains("CAIRN-AGENT-UP")) && Date() < deadline && p.isRunning { usleep(100_000) }
        try #require(lastTick() >= 3, "the guest did not start ticking: \(console())")

        try env.expect(0, ["init"])
        // The post hook holds the reading back for 3 s after the point in time while the guest
        // keeps writing: without a point-in-time image the backup would see those writes.
        let hook = "sleep 3"
        let tickBefore = lastTick()
        let running = try env.cli.start(["backup", "--vm", "tiny", "--qmp", qmp, "--guest-agent", qga, "--post-hook", hook,
                                         "--scratch-dir", env.dir.path, "--json"])
        // The guest's own tick log when Cairn reports the transaction done (the hook then holds
        // the reading back for 3 s).
        while !running.stderrSoFar.contains("point in time taken") && running.isRunning { usleep(20_000) }
        let tickAtPointInTime = lastTick()
        let r1 = running.wait()
        #expect(r1.status == 0, "\(r1)")
        let tickAfter1 = lastTick()
        #expect(r1.stdout.contains("\"consistency\":\"application\""), "\(r1.stdout) \(r1.stderr)")
        #expect(r1.stdout.contains("\"read_mode\":\"full\"") && r1.stdout.contains("\"name\":\"vda\""), "\(r1.stdout)")
        let img1 = env.file("r1.raw")
        try env.expect(0, ["restore", "latest", "--vm", "tiny", "--to", img1])
        let m1 = try Self.readMarkers(img1, diskSize: size)
        #expect(m1.count >= 3 && m1.records >= m1.count && m1.records <= m1.count + 1 && m1.beyond == nil,
                "snapshot 1 is not one instant: count \(m1.count), records 1...\(m1.records), beyond \(String(describing: m1.beyond))")
        // The image holds the guest's state at the transaction: no earlier than the backup's start,
        // no later than Cairn's "point in time taken", although the guest wrote on until the
        // reading was done (a backup reading the live disk would hold those later records).
        #expect(m1.count >= tickBefore && m1.count <= tickAtPointInTime + 1,
                "count \(m1.count) outside the ticks \(tickBefore)...\(tickAtPointInTime) around the transaction")
        #expect(tickAfter1 >= m1.count + 2, "the guest kept writing during the backup (tick \(tickAfter1) vs count \(m1.count))")

        // Let it write more, then an incremental: CBT, only the changed region read.
        let target = tickAfter1 + 2
        while lastTick() < target && Date() < deadline.addingTimeInterval(60) { usleep(100_000) }
        let r2 = try env.expect(0, ["backup", "--vm", "tiny", "--qmp", qmp, "--guest-agent", qga, "--post-hook", hook,
                                    "--scratch-dir", env.dir.path, "--json"])
        #expect(r2.stdout.contains("\"read_mode\":\"cbt\""), "\(r2.stdout) \(r2.stderr)")
        let summary = try #require(try JSONSerialization.jsonObject(with: Data((r2.stdout.split(separator: "\n").last ?? "").utf8)) as? [String: Any])
        let d = try #require((summary["disks"] as? [[String: Any]])?.first)
        let requested = d["nbd_bytes_requested"] as? Int ?? -1
        // The guest touched the count and a few log records: the bitmap marks a few 64 KiB
        // clusters; the read is those chunks plus the 1 % sample and the guest inspection's
        // metadata reads (FAT tables, directories), far below the disk's size.
        let dirty = d["dirty_bytes"] as? Int ?? -1
        #expect(dirty > 0 && dirty <= 1 * MiB, "dirty \(dirty): \(d)")
        #expect(requested > 0 && requested <= 4 * MiB && requested * 8 < size, "incremental read \(requested) bytes of \(size): \(d)")
        let img2 = env.file("r2.raw")
        try env.expect(0, ["restore", "latest", "--vm", "tiny", "--to", img2])
        let m2 = try Self.readMarkers(img2, diskSize: size)
        #expect(m2.count > m1.count && m2.records >= m2.count && m2.records <= m2.count + 1 && m2.beyond == nil,
                "snapshot 2: count \(m2.count), records 1...\(m2.records), beyond \(String(describing: m2.beyond))")
        // The boot partition (FAT, p1) is the same in both snapshots and in the image the VM
        // started from (the guest writes only its ext4 on p2 and the marker region).
        let table = try Tool.run("sfdisk", ["-J", img2]).stdout
        let parts = try #require(((try JSONSerialization.jsonObject(with: Data(table.utf8)) as? [String: Any])?["partitiontable"] as? [String: Any])?["partitions"] as? [[String: Any]])
        let p1 = try #require(parts.first)
        let start = (p1["start"] as? Int ?? 0) * 512, length = (p1["size"] as? Int ?? 0) * 512
        #expect(length > 0)
        for img in [img1, img2] {
            #expect(try Tool.run("cmp", ["-i", "\(start)", "-n", "\(length)", img, "\(vmDir)/boot-agent.raw"], check: false).status == 0)
        }

        // The VM still runs, nothing of Cairn is left inside QEMU, and the guest is thawed.
        #expect(p.isRunning)
        let q = try QMPClient.connect(path: qmp, timeout: 10)
        let nodes = try #require(try q.execute("query-named-block-nodes", arguments: ["flat": true]) as? [[String: Any]])
        q.close()
        #expect(!nodes.contains { ($0["node-name"] as? String ?? "").hasPrefix("cairn-f") })
        let agent = try GuestAgentClient.connect(path: qga, timeout: 10)
        #expect(try agent.fsfreezeStatus() == "thawed")
        agent.close()
        // The VM's configuration is in the snapshot: its command line, memory, disks.
        let config = try #require(try env.snapshots().last?["vm_config"] as? [String: Any])
        #expect((config["cmdline"] as? [String])?.first?.hasSuffix("qemu-system-x86_64") == true, "\(config)")
        #expect((config["memory"] as? Int) == 256 * MiB, "\(config)")
        #expect(((config["disks"] as? [[String: Any]])?.first?["name"] as? String) == "vda", "\(config)")
        // An instant restore of that snapshot starts the same machine: q35, 256 MiB, one CPU
        // (a stand-in for QEMU records the arguments it was started with, then exits).
        let fakeQEMU = env.file("fake-qemu.sh")
        let argsFile = env.file("fake-qemu.args")
        try "#!/bin/sh\nprintf '%s\\n' \"$@\" > '\(argsFile)'\n".write(toFile: fakeQEMU, atomically: true, encoding: .utf8)
        #expect(chmod(fakeQEMU, 0o755) == 0)
        let instant = try env.expect(0, ["instant-restore", "latest", "--vm", "tiny", "--accel", "tcg", "--no-network",
                                         "--overlay-dir", env.file("overlays"), "--discard-overlay", "--qemu", fakeQEMU])
        #expect(instant.stderr.contains("recorded VM: 1 CPU, 256 MiB, q35"), "\(instant.stderr)")
        let qemuArgs = try String(contentsOfFile: argsFile, encoding: .utf8).split(separator: "\n").map(String.init)
        let machine = qemuArgs.firstIndex(of: "-machine").map { qemuArgs[$0 + 1] }
        let memory = qemuArgs.firstIndex(of: "-m").map { qemuArgs[$0 + 1] }
        let cpus = qemuArgs.firstIndex(of: "-smp").map { qemuArgs[$0 + 1] }
        #expect(machine == "q35" && memory == "256" && cpus == "1", "\(qemuArgs)")
        let snaps = try env.expect(0, ["snapshots"]).stdout
        #expect(snaps.contains("application") && snaps.contains("cbt"), "\(snaps)")
    }
}
