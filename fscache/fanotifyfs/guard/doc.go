// Package guard keeps the fanotify groups of a daemon without a supervisor
// from failing open when the daemon dies.
//
// A daemon without a supervisor is the only holder of its group; if it
// died, the kernel would allow every pending and later read of the cache
// files and readers would see their holes as file data. A guard is a child
// process (the daemon's own binary, re-executed; see MaybeRun) holding a
// copy of every group the daemon serves. While the daemon lives it only
// holds them. When the daemon dies (or lets go with LetGo, closing while a
// mount it detached lazily is still read) the guard detaches the daemon's
// mounts, denies with EIO the events the daemon had read and never
// answered, and then every event still arriving: the loss is loud, never
// silent zeros.
//
// Exit condition. A detached mount lives on while a file of it is open,
// and its reads still raise events, so the guard must outlive it, but no
// longer: while the guard lives its marks deny reads of the cache files to
// everyone. Each group comes with an inotify instance watching the root of
// every mount reading through it (the daemon adds a watch per mount with
// WatchRoot; the guard adds one before it detaches). Measured on Linux
// 6.18: an inotify watch does not pin the superblock (a plain umount
// succeeds with one in place), a detached EROFS mount with an open file
// raises nothing, and when the last file closes the superblock shuts down,
// IN_UNMOUNT and IN_IGNORED arrive and the watch leaves
// /proc/PID/fdinfo/FD of the inotify fd (Watches). So a group whose
// inotify instance has no watch left serves no mount any more: the guard
// closes it (its marks go), and exits once it holds none.
//
// Restart on the same cache. While a guard holds its group, the group's
// marks stay on the cache files, so a new daemon on the same cache
// directory would have its own fetcher's writes and its readers' events
// denied by the old guard. So each guard listens on a unix socket in every
// cache directory of its daemon (Update.Dirs; Sockets lists them). A new
// daemon, before it opens a cache directory, asks every guard listening
// there (Ask): a guard whose daemon is dead hands over all its groups and
// their inotify instances (SCM_RIGHTS), waits for the new daemon's
// acknowledgement (Handover.Ack, sent once the new daemon's own guard
// holds copies too) and exits; it answers every event it read before it
// hands over. The new daemon then serves the old groups' events itself:
// they name the same cache files, so the readers of the old, detached
// mounts read the right bytes again, and it drops an old group once its
// inotify instance has no watch left. A guard whose daemon lives refuses
// (two daemons on one cache directory serve each other's events).
//
// Supervised daemons. A daemon with a supervisor hands it its own group,
// and the supervisor (nydus-snapshotter's protocol) keeps one fd. A group
// it takes over from a crashed daemon's guard needs another holder, so it
// starts a guard holding those groups only (Update.Supervised). If that
// daemon dies, the guard detaches nothing and denies nothing but the
// events the daemon had read: the rest wait, as on the supervisor's copy,
// for the upgraded daemon, which takes the groups over at start like any
// successor.
//
// Orphans. An event the daemon read and never answered can only be
// answered by the fd number the daemon saw, which died with it, so every
// number up to the daemon's RLIMIT_NOFILE is tried (Update.MaxFD; a daemon
// keeps that limit at most MaxFD+1, so that this takes about 0.1 s).
//
// Protocol, on a guard's socket: the client sends one byte, '?' (query)
// or 'T' (take); the guard answers a Reply (JSON) and, for a take when
// its daemon is gone, the fds of its holdings with it (group, inotify,
// group, inotify, ...); the client then sends 'A' once it holds them
// safely, and the guard exits. Only a peer of the guard's own uid is
// answered. The daemon tells its guard of changes as JSON lines (Update)
// on a pipe whose EOF means the daemon is gone.
package guard
