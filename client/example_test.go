package client_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"

	"golang.org/x/oauth2"

	"github.com/tokenpipe/tokenpipe/client"
)

// An application calls an API protected by tokenpipe. It signs the user in
// once; a 401 (another device took the token, an operator revoked it) is
// recovered without the application noticing, and only a sign-in the issuer
// ended reaches it, as ErrSignInAgain.
func Example() {
	tr := client.New(client.Config{
		OAuth2: oauth2.Config{
			ClientID:     "mobile",
			ClientSecret: "SECRET",
			Scopes:       []string{"profile"},
			Endpoint:     oauth2.Endpoint{TokenURL: "https://auth.example.com/oauth2/token"},
		},
		Grant: client.Password("alice", "PW"), // or client.ClientCredentials()
		Hosts: []string{"api.example.com"},    // the token goes nowhere else
		Log:   slog.Default(),                 // never sees a token
	})
	defer tr.Close()
	api := tr.Client()

	resp, err := api.Get("https://api.example.com/profile")
	if errors.Is(err, client.ErrSignInAgain) {
		// The refresh token was revoked, expired or reused: ask the user.
		if err := tr.SignIn(context.Background(), client.Password("alice", "PW")); err != nil {
			log.Fatal(err)
		}
		resp, err = api.Get("https://api.example.com/profile")
	}
	if err != nil {
		log.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	fmt.Println(resp.Status, string(body))
}
