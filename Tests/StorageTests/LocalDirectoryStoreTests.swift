import CairnCore
import CairnTestSupport
import Foundation
import Storage
import Testing

@Suite struct LocalDirectoryStoreTests {
    @Test func putGetListDelete() throws {
        let dir = try TempDir()
        let store = LocalDirectoryStore(root: dir.path)
        let name = String(repeating: "ab", count: 32)
        try store.put(ObjectKey("chunks", name), Array("hello".utf8))
        try store.put(ObjectKey("snapshots", "s1"), Array("world".utf8))
        try store.barrier()
        #expect(FileManager.default.fileExists(atPath: "\(dir.path)/chunks/ab/\(name)"))
        #expect(try store.get(ObjectKey("chunks", name)) == Array("hello".utf8))
        #expect(try store.list("chunks") == [name])
        #expect(try store.list("snapshots") == ["s1"])
        #expect(try store.exists(ObjectKey("snapshots", "s1")))
        #expect(try store.size(ObjectKey("snapshots", "s1")) == 5)
        // Nothing is left in tmp/ after successful puts.
        #expect(try store.listDirectory("\(dir.path)/tmp").isEmpty)
        try store.delete(ObjectKey("snapshots", "s1"))
        #expect(try !store.exists(ObjectKey("snapshots", "s1")))
        let e = #expect(throws: CairnError.self) { try store.get(ObjectKey("snapshots", "s1")) }
        #expect(e?.code == .notFound)
        #expect(try store.list("nothing-here").isEmpty)
    }

    @Test func staleTemporariesOfDeadOwnersAreRemoved() throws {
        let dir = try TempDir()
        let store = LocalDirectoryStore(root: dir.path)
        try FileManager.default.createDirectory(atPath: "\(dir.path)/tmp", withIntermediateDirectories: true)
        _ = FileManager.default.createFile(atPath: "\(dir.path)/tmp/deadbeef.123", contents: Data([1]))
        _ = FileManager.default.createFile(atPath: "\(dir.path)/tmp/live0001.456", contents: Data([1]))
        let removed = try store.removeStaleTemporaries { ["live0001"] }
        #expect(removed == 1)
        #expect(try store.listDirectory("\(dir.path)/tmp") == ["live0001.456"])
    }

    @Test("a lock file's temporary left by a killed writer goes once it is old and its owner is not live")
    func staleLockTemporaries() throws {
        let dir = try TempDir()
        let store = LocalDirectoryStore(root: dir.path)
        let locks = "\(dir.path)/locks"
        try FileManager.default.createDirectory(atPath: locks, withIntermediateDirectories: true)
        let old = time(nil) - Int(LocalDirectoryStore.lockTemporaryMaxAge) - 60
        for name in [".tmp-dead0001.1", ".tmp-live0001.2", ".tmp-dead0002.3"] {
            _ = FileManager.default.createFile(atPath: "\(locks)/\(name)", contents: Data([1]))
        }
        for name in [".tmp-dead0001.1", ".tmp-live0001.2"] {
            var times = [timeval(tv_sec: old, tv_usec: 0), timeval(tv_sec: old, tv_usec: 0)]
            #expect(utimes("\(locks)/\(name)", &times) == 0)
        }
        // Old and dead: removed. Old but its owner is live: kept. Dead but fresh (perhaps a lock
        // being taken right now, whose file is not renamed yet): kept.
        #expect(try store.removeStaleTemporaries { ["live0001"] } == 1)
        let left = try FileManager.default.contentsOfDirectory(atPath: locks).sorted()
        #expect(left == [".tmp-dead0002.3", ".tmp-live0001.2"])
        // And the store names its own lock temporaries after the lock, so the rule can apply.
        try store.put(ObjectKey("locks", "abcd0001"), [1, 2, 3])
        #expect(try store.list("locks") == ["abcd0001"])
    }

    @Test("a fresh lock temporary whose writer's pid is gone from this host is removed at once; a live or foreign writer's is kept")
    func lockTemporariesOfDeadWriters() throws {
        let dir = try TempDir()
        let store = LocalDirectoryStore(root: dir.path)
        let locks = "\(dir.path)/locks"
        try FileManager.default.createDirectory(atPath: locks, withIntermediateDirectories: true)
        // A pid that certainly ran on this host and has exited.
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/true")
        try p.run()
        p.waitUntilExit()
        let dead = WriterTag(pid: p.processIdentifier, host: WriterTag.current.host)
        #expect(dead.isDeadWriterOnThisHost)
        let liveHere = WriterTag(pid: getppid(), host: WriterTag.current.host)
        let elsewhere = WriterTag(pid: p.processIdentifier, host: WriterTag.hostTag("some-other-host.example"))
        let names = [".tmp-dead0001.\(dead.text).7", ".tmp-live0001.\(liveHere.text).8",
                     ".tmp-dead0002.\(elsewhere.text).9", ".tmp-dead0003.\(WriterTag.current.text).10"]
        for name in names {
            _ = FileManager.default.createFile(atPath: "\(locks)/\(name)", contents: Data([1]))
        }
        #expect(try store.removeStaleTemporaries { [] } == 1)
        let left = try FileManager.default.contentsOfDirectory(atPath: locks).sorted()
        #expect(left == names.dropFirst().sorted())
        // The store's own lock temporaries carry its writer tag.
        #expect(WriterTag(Substring(WriterTag.current.text)) == WriterTag.current)
        #expect(WriterTag("123") == nil && WriterTag("12-xyz") == nil && WriterTag("4567891234") == nil)
    }

    @Test("sync level filesystem: grouped chunk puts are readable at once, named after a syncfs, and leave no temporaries")
    func groupCommittedChunks() throws {
        let dir = try TempDir()
        let store = LocalDirectoryStore(root: dir.path, syncLevel: .filesystem)
        #expect(store.syncLevel == .filesystem)
        let names = (0..<200).map { String(format: "%064x", $0 * 7919) }
        DispatchQueue.concurrentPerform(iterations: names.count) { i in
            let bytes = [UInt8](repeating: UInt8(i & 0xff), count: 1000 + i)
            try! store.put(ObjectKey("chunks", names[i]), bytes)
        }
        // Read-after-write in this process, before any barrier.
        #expect(Set(try store.list("chunks")) == Set(names))
        #expect(try store.get(ObjectKey("chunks", names[17])) == [UInt8](repeating: 17, count: 1017))
        try store.barrier()
        #expect(try store.listDirectory("\(dir.path)/tmp").isEmpty)
        // Other namespaces are still synced per file and named at once.
        try store.put(ObjectKey("snapshots", "s1"), [1])
        #expect(FileManager.default.fileExists(atPath: "\(dir.path)/snapshots/s1"))
    }

    @Test("a group whose rename fails: the barrier names the file, its temporary is removed, later puts fail too")
    func groupCommitFailure() throws {
        let dir = try TempDir()
        let store = LocalDirectoryStore(root: dir.path, syncLevel: .filesystem)
        let name = "ab" + String(repeating: "0", count: 62)
        try store.put(ObjectKey("chunks", name), [1, 2, 3])
        // The group waits up to GroupCommit.maxDelay for company; take its directory away.
        #expect(rmdir("\(dir.path)/chunks/ab") == 0)
        #expect(throws: CairnError.self) { try store.barrier() }
        do {
            try store.barrier()
        } catch let e as CairnError {
            #expect(e.path == "\(dir.path)/chunks/ab/\(name)" && e.message.contains("rename"), "\(e)")
        }
        #expect(try store.listDirectory("\(dir.path)/tmp").isEmpty, "the temporary is removed")
        #expect(throws: CairnError.self) { try store.put(ObjectKey("chunks", "cd" + String(repeating: "0", count: 62)), [4]) }
        #expect(try store.listDirectory("\(dir.path)/tmp").isEmpty)
    }

    @Test func fullDiskIsReportedAsNoSpace() throws {
        // /dev/full answers every write with ENOSPC: the error must say so and leave no temp file.
        let e = #expect(throws: CairnError.self) {
            let f = try PosixFile(path: "/dev/full", flags: O_WRONLY)
            try [UInt8](repeating: 1, count: 10).withUnsafeBytes { try f.pwrite($0, at: 0) }
        }
        #expect(e?.code == .noSpace)
        #expect(e?.description.contains("/dev/full") == true)
    }
}
