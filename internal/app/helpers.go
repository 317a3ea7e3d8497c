package app

import (
	"crypto/rand"
	"encoding/hex"
	"flag"
	"io"
	"os"
)

func FlagErr(err error) error {
	if err == flag.ErrHelp {
		return ErrHelp
	}
	return ErrUsage
}

func RandomID() string {
	b := make([]byte, 5)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// IsTerminal reports whether w is a character device (a person watching).
func IsTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}
